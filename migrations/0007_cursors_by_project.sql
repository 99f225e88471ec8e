-- The cursors of some projects, whichever projector's, as a node reads them every few milliseconds
-- while a write waits for its projection (`?wait=true`): without it, each read looked through the
-- cursors of every project.
CREATE INDEX cursors_by_project ON cursors (project);
