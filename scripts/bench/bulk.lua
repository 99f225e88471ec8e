-- wrk: POST `_bulk` requests of wrk's second argument (default 1000) new items each, fresh ids from
-- a per-thread prefix and a counter. The project is wrk's first argument after `--`.
-- The third group of the id differs from put.lua's, so a _bulk run after a PUT run on the same
-- server writes new items rather than overwriting them.
math.randomseed(os.time() * 1000 + 2)

function setup(thread)
    thread:set("prefix", string.format("%08x", math.random(0, 0x7fffffff)))
end

function init(args)
    project = args[1] or "bench"
    size = tonumber(args[2] or "1000")
    counter = 0
    item = '{"project_version":1,"title":"A benchmark article","views":42,'
        .. '"date_created":"2026-11-22 10:00:00"}\n'
end

function request()
    local lines = {}
    for i = 1, size do
        counter = counter + 1
        lines[#lines + 1] = string.format(
            '{"put":{"blueprint":"article","id":"%s-0001-4000-8000-%012x"}}\n', prefix, counter)
        lines[#lines + 1] = item
    end
    return wrk.format("POST", "/" .. project .. "/_bulk", nil, table.concat(lines))
end
