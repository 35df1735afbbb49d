-- A search that names a facet and a state (a task's crashes, a pool's
-- finished jobs, a bot's...) or a detail and its blame checks the second
-- filter in the facet's index instead of reading each candidate's row:
-- at ten million jobs, counting 10,000 matches of pool and state read
-- 10,000 rows of about 2 KB each; now it reads the index alone.
DROP INDEX jobs_task;
CREATE INDEX jobs_task ON jobs (task, archived, created_at DESC, id, state);
DROP INDEX jobs_pool;
CREATE INDEX jobs_pool ON jobs (pool, archived, created_at DESC, id, state);
DROP INDEX jobs_bot;
CREATE INDEX jobs_bot ON jobs (bot_id, archived, created_at DESC, id, state);
DROP INDEX jobs_blame;
CREATE INDEX jobs_blame ON jobs (blame, archived, created_at DESC, id, state, detail);
DROP INDEX jobs_detail;
CREATE INDEX jobs_detail ON jobs (detail, archived, created_at DESC, id, state, blame);
