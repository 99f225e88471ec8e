-- One project's dead letters in the order `GET /{project}/_dead_letters` lists them and a retry
-- queues them again (by projector, then revision), read a page at a time.
CREATE INDEX dead_letters_by_project ON dead_letters (project, projector, revision);
