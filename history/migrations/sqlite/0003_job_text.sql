-- Full text at scale. A text search used to take every match from the
-- text index and sort them by creation time, reading each match's whole
-- row (about 2 KB): at 10 million jobs, a word in 100,000 of them took
-- half a second. `job_text` holds only the jobs with words in them, and
-- only what a search filters and orders on, so a common word is answered
-- by walking it newest first (src/text.rs) and a rare one by
-- sorting its few matches. Its rowid is the job's, like `jobs_text`'s.
CREATE TABLE job_text (
    seq INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    id TEXT NOT NULL,
    archived INTEGER NOT NULL,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    pool TEXT NOT NULL,
    blame TEXT,
    detail TEXT,
    bot_id TEXT,
    source_message_id TEXT
);
INSERT INTO job_text
    SELECT seq, created_at, id, archived, state, task, pool, blame, detail, bot_id, source_message_id
    FROM jobs WHERE search_text != '';
CREATE INDEX job_text_created ON job_text (created_at DESC, id);
CREATE INDEX job_text_state ON job_text (state, created_at DESC, id);
CREATE INDEX job_text_task ON job_text (task, created_at DESC, id);
CREATE INDEX job_text_pool ON job_text (pool, created_at DESC, id);
CREATE INDEX job_text_blame ON job_text (blame, created_at DESC, id);
CREATE INDEX job_text_detail ON job_text (detail, created_at DESC, id);
CREATE INDEX job_text_bot ON job_text (bot_id, created_at DESC, id);

-- Kept by the jobs table's own writes, like the text index.
CREATE TRIGGER job_text_insert AFTER INSERT ON jobs WHEN new.search_text != '' BEGIN
    INSERT INTO job_text VALUES (new.seq, new.created_at, new.id, new.archived, new.state,
        new.task, new.pool, new.blame, new.detail, new.bot_id, new.source_message_id);
END;
CREATE TRIGGER job_text_update AFTER UPDATE OF
    search_text, created_at, archived, state, task, pool, blame, detail, bot_id, source_message_id
    ON jobs WHEN old.search_text != '' OR new.search_text != '' BEGIN
    DELETE FROM job_text WHERE seq = old.seq AND new.search_text = '';
    INSERT INTO job_text
        SELECT new.seq, new.created_at, new.id, new.archived, new.state, new.task, new.pool,
            new.blame, new.detail, new.bot_id, new.source_message_id
        WHERE new.search_text != ''
    ON CONFLICT (seq) DO UPDATE SET created_at = excluded.created_at,
        archived = excluded.archived, state = excluded.state, task = excluded.task,
        pool = excluded.pool, blame = excluded.blame, detail = excluded.detail,
        bot_id = excluded.bot_id, source_message_id = excluded.source_message_id;
END;
CREATE TRIGGER job_text_delete AFTER DELETE ON jobs WHEN old.search_text != '' BEGIN
    DELETE FROM job_text WHERE seq = old.seq;
END;
