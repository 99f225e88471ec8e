-- wrk: PUT one new item per request, each with a fresh id (a per-thread prefix and a counter, so the
-- client spends nothing on randomness). The project is wrk's first argument after `--`.
-- The third group of the id differs from bulk.lua's, so a _bulk run after a PUT run on the same
-- server writes new items rather than overwriting them.
math.randomseed(os.time() * 1000 + 1)
local threads = {}

function setup(thread)
    thread:set("prefix", string.format("%08x", math.random(0, 0x7fffffff)))
    table.insert(threads, thread)
end

function init(args)
    project = args[1] or "bench"
    counter = 0
    body = '{"project_version":1,"title":"A benchmark article","views":42,'
        .. '"date_created":"2026-11-22 10:00:00"}'
end

function request()
    counter = counter + 1
    local id = string.format("%s-0000-4000-8000-%012x", prefix, counter)
    return wrk.format("PUT", "/" .. project .. "/article/" .. id, nil, body)
end

function response(status, headers, body)
    if status ~= 200 then
        errors = (errors or 0) + 1
    end
end
