-- The execution database (history/src/lib.rs). Times are microseconds
-- since the epoch, UTC; ids are UUIDs in text.

-- One row per job: its latest revision as the recorder saw it.
CREATE TABLE jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    -- The job's revision in the jobs bucket (its stream sequence): a row
    -- is only ever replaced by a higher one.
    rev BIGINT NOT NULL,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    pool TEXT NOT NULL,
    priority BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    blame TEXT,
    detail TEXT,
    bot_id TEXT,
    source_message_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- 0 live, 1 archived (the bucket's copy is being removed),
    -- 2 removed from the bucket, 3 its delete marker purged too.
    archive_state BIGINT NOT NULL DEFAULT 0,
    -- 1 once archived (archive_state 1 to 3): what searches look at.
    archived BIGINT NOT NULL DEFAULT 0,
    archived_at BIGINT,
    -- What full-text search looks in: description and the crash's log
    -- tail and status file.
    search_text TEXT NOT NULL DEFAULT '',
    -- The job record as JSON, as the bucket held it.
    body TEXT NOT NULL
);
CREATE INDEX jobs_created ON jobs (archived, created_at DESC, id);
CREATE INDEX jobs_state ON jobs (state, archived, created_at DESC, id);
CREATE INDEX jobs_task ON jobs (task, archived, created_at DESC, id);
CREATE INDEX jobs_pool ON jobs (pool, archived, created_at DESC, id);
CREATE INDEX jobs_blame ON jobs (blame, archived, created_at DESC, id);
CREATE INDEX jobs_detail ON jobs (detail, archived, created_at DESC, id);
CREATE INDEX jobs_bot ON jobs (bot_id, archived, created_at DESC, id);
CREATE INDEX jobs_source ON jobs (source_message_id);
CREATE INDEX jobs_updated ON jobs (archived, updated_at);
-- The janitor's work list: only jobs between archival steps (1 and 2),
-- not the millions done with (3).
CREATE INDEX jobs_archive ON jobs (archive_state, archived_at) WHERE archive_state IN (1, 2);


-- Every history entry a job ever had, also those its record dropped
-- (idx counts from the job's first entry).
CREATE TABLE history (
    job_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    at BIGINT NOT NULL,
    action TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    actor TEXT NOT NULL,
    bot_id TEXT,
    resource TEXT,
    note TEXT,
    PRIMARY KEY (job_id, idx)
);

-- One row per attempt: who ran it and how it ended.
CREATE TABLE attempts (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    bot_id TEXT,
    resource TEXT,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    ended_as TEXT,
    note TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX attempts_bot ON attempts (bot_id, started_at);

-- Statistics of archived jobs: counts per minute of their last change.
CREATE TABLE stats_minute (
    minute BIGINT NOT NULL,
    state TEXT NOT NULL,
    blame TEXT NOT NULL,
    detail TEXT NOT NULL,
    retried BIGINT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (minute, state, blame, detail, retried)
);
ALTER TABLE jobs ADD COLUMN search_words tsvector
    GENERATED ALWAYS AS (
        to_tsvector('simple', regexp_replace(search_text, '[^[:alnum:]]+', ' ', 'g'))
    ) STORED;
CREATE INDEX jobs_text ON jobs USING GIN (search_words);

-- The same counts per hour: a long window adds up hours, and minutes only
-- at its ends.
CREATE TABLE stats_hour (
    hour BIGINT NOT NULL,
    state TEXT NOT NULL,
    blame TEXT NOT NULL,
    detail TEXT NOT NULL,
    retried BIGINT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (hour, state, blame, detail, retried)
);
