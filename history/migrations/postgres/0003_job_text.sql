-- Full text at scale. A text search used to take every match from the
-- GIN index on `jobs` and sort them by creation time, reading each
-- match's whole row (about 2 KB; at 100,000 matches the bitmap goes lossy
-- too): at 10 million jobs, a common word took 400 ms. `job_text` holds
-- only the jobs with words in them, their words and what a search filters
-- and orders on, so a common word is answered by walking it newest first
-- and a rare one by sorting its few matches (src/text.rs).
CREATE TABLE job_text (
    seq BIGINT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    id TEXT NOT NULL,
    archived BIGINT NOT NULL,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    pool TEXT NOT NULL,
    blame TEXT,
    detail TEXT,
    bot_id TEXT,
    source_message_id TEXT,
    words tsvector NOT NULL
);
INSERT INTO job_text
    SELECT seq, created_at, id, archived, state, task, pool, blame, detail, bot_id,
        source_message_id, search_words
    FROM jobs WHERE search_text <> '';
-- Without GIN's pending list: entries queued there (up to 4 MB, until
-- the next vacuum) are read one by one by every search: on a freshly
-- loaded database a rare word's lookup took 3.4 ms instead of 0.15 ms.
CREATE INDEX job_text_words ON job_text USING GIN (words) WITH (fastupdate = off);
CREATE INDEX job_text_created ON job_text (created_at DESC, id);
CREATE INDEX job_text_state ON job_text (state, created_at DESC, id);
CREATE INDEX job_text_task ON job_text (task, created_at DESC, id);
CREATE INDEX job_text_pool ON job_text (pool, created_at DESC, id);
CREATE INDEX job_text_blame ON job_text (blame, created_at DESC, id);
CREATE INDEX job_text_detail ON job_text (detail, created_at DESC, id);
CREATE INDEX job_text_bot ON job_text (bot_id, created_at DESC, id);

-- The words now live in job_text alone: `jobs` no longer computes them
-- on every write.
DROP INDEX jobs_text;
ALTER TABLE jobs DROP COLUMN search_words;

-- Kept by the jobs table's own writes. The words are made again only
-- when the text changed.
CREATE FUNCTION job_text_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM job_text WHERE seq = OLD.seq;
        RETURN NULL;
    END IF;
    IF NEW.search_text = '' THEN
        DELETE FROM job_text WHERE seq = NEW.seq;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.search_text = NEW.search_text THEN
        UPDATE job_text SET created_at = NEW.created_at, archived = NEW.archived,
            state = NEW.state, task = NEW.task, pool = NEW.pool, blame = NEW.blame,
            detail = NEW.detail, bot_id = NEW.bot_id, source_message_id = NEW.source_message_id
        WHERE seq = NEW.seq;
        RETURN NULL;
    END IF;
    INSERT INTO job_text VALUES (NEW.seq, NEW.created_at, NEW.id, NEW.archived, NEW.state,
        NEW.task, NEW.pool, NEW.blame, NEW.detail, NEW.bot_id, NEW.source_message_id,
        to_tsvector('simple', regexp_replace(NEW.search_text, '[^[:alnum:]]+', ' ', 'g')))
    ON CONFLICT (seq) DO UPDATE SET created_at = excluded.created_at,
        archived = excluded.archived, state = excluded.state, task = excluded.task,
        pool = excluded.pool, blame = excluded.blame, detail = excluded.detail,
        bot_id = excluded.bot_id, source_message_id = excluded.source_message_id,
        words = excluded.words;
    RETURN NULL;
END
$$;
CREATE TRIGGER job_text_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.search_text <> '') EXECUTE FUNCTION job_text_sync();
CREATE TRIGGER job_text_update AFTER UPDATE OF
    search_text, created_at, archived, state, task, pool, blame, detail, bot_id, source_message_id
    ON jobs FOR EACH ROW WHEN (OLD.search_text <> '' OR NEW.search_text <> '')
    EXECUTE FUNCTION job_text_sync();
CREATE TRIGGER job_text_delete AFTER DELETE ON jobs
    FOR EACH ROW WHEN (OLD.search_text <> '') EXECUTE FUNCTION job_text_sync();
