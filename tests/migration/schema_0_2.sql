-- The schema of the previous release, as `git show 1bbef69:asyncsat/schema.sql` prints it
-- (commit 1bbef69, the last of 0.2: the schema tests/migration/test_migration_0_2.py upgrades).
-- A fixture: never edit it; a database of that release is built from it.

-- asyncsat schema: the one source of truth.
-- Applies cleanly to an empty database and again to an existing one
-- (every statement is idempotent). Needs PostgreSQL 15 or newer, no extension.

CREATE TABLE IF NOT EXISTS provider (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE
                CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    protocol    text NOT NULL CHECK (protocol IN ('http', 'ftp', 'odata', 'stac', 'm2m')),
    url         text,
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(settings) = 'object'),
    -- true for the providers made implicitly for the host of a `get` URL
    implicit    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS credential (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider_id     bigint NOT NULL REFERENCES provider (id) ON DELETE CASCADE,
    username        text NOT NULL,
    secret          text NOT NULL,
    max_connections integer NOT NULL DEFAULT 2 CHECK (max_connections > 0),
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider_id, username)
);

CREATE TABLE IF NOT EXISTS request (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the provider to search, or to use for every URL (NULL: match by URL)
    provider_id bigint REFERENCES provider (id) ON DELETE SET NULL,
    urls        text[],
    search      jsonb,
    dest        text,
    checksum    text,
    status      text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'resolved', 'failed', 'cancelled')),
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (urls IS NOT NULL OR search IS NOT NULL)
);

CREATE TABLE IF NOT EXISTS download (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      bigint REFERENCES request (id) ON DELETE SET NULL,
    provider_id     bigint NOT NULL REFERENCES provider (id),
    url             text NOT NULL,
    -- final file name; NULL until the catalog or the server names it
    name            text,
    dest            text,
    size            bigint CHECK (size >= 0),
    checksum_algo   text,
    checksum_value  text,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled', 'offline')),
    bytes_done      bigint NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    -- consecutive failed attempts that made no progress (the retry budget)
    failures        integer NOT NULL DEFAULT 0,
    error           text,
    path            text,
    etag            text,
    last_modified   text,
    login_user      text,
    login_secret    text,
    not_before      timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);

-- 0.2: the login of a `get` with a URL pattern, apart from its URLs until it is resolved
ALTER TABLE request ADD COLUMN IF NOT EXISTS login_user text;
ALTER TABLE request ADD COLUMN IF NOT EXISTS login_secret text;

-- a product is fetched once per provider and URL; the index holds a hash of the URL, as
-- a btree cannot hold a pre-signed URL of several kB (0.1 had UNIQUE (provider_id, url))
ALTER TABLE download DROP CONSTRAINT IF EXISTS download_provider_id_url_key;
-- where `size` comes from: a catalog or a user (binding: a server announcing another
-- size is serving something else) or the server itself (a new version may change it)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'download'
                     AND column_name = 'size_origin') THEN
        -- 0.1 had no catalogs: the sizes of its rows came from the servers
        ALTER TABLE download ADD COLUMN size_origin text NOT NULL DEFAULT 'server'
            CHECK (size_origin IN ('catalog', 'server'));
        ALTER TABLE download ALTER COLUMN size_origin SET DEFAULT 'catalog';
    END IF;
END;
$$;
CREATE UNIQUE INDEX IF NOT EXISTS download_url_unique ON download (provider_id, md5(url));

CREATE INDEX IF NOT EXISTS download_queued_idx
    ON download (provider_id, not_before, id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS download_request_idx ON download (request_id);
-- two downloads never share a file on disk
CREATE UNIQUE INDEX IF NOT EXISTS download_file_unique
    ON download (provider_id, coalesce(dest, ''), name) WHERE name IS NOT NULL;

-- every request that asked for a download (a product is fetched once)
CREATE TABLE IF NOT EXISTS request_download (
    request_id  bigint NOT NULL REFERENCES request (id) ON DELETE CASCADE,
    download_id bigint NOT NULL REFERENCES download (id) ON DELETE CASCADE,
    PRIMARY KEY (request_id, download_id)
);

-- status history: "what happened to product X" is one query
CREATE TABLE IF NOT EXISTS download_event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    download_id bigint NOT NULL REFERENCES download (id) ON DELETE CASCADE,
    status      text NOT NULL,
    bytes_done  bigint NOT NULL,
    attempts    integer NOT NULL,
    error       text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS download_event_download_idx ON download_event (download_id, id);

CREATE OR REPLACE FUNCTION asyncsat_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER request_touch BEFORE UPDATE ON request
    FOR EACH ROW EXECUTE FUNCTION asyncsat_touch();
CREATE OR REPLACE TRIGGER download_touch BEFORE UPDATE ON download
    FOR EACH ROW EXECUTE FUNCTION asyncsat_touch();
CREATE OR REPLACE TRIGGER credential_touch BEFORE UPDATE ON credential
    FOR EACH ROW EXECUTE FUNCTION asyncsat_touch();

-- New requests wake the daemon.
CREATE OR REPLACE FUNCTION asyncsat_notify_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'queued' THEN
        PERFORM pg_notify('asyncsat', json_build_object('type', 'request', 'id', NEW.id)::text);
    END IF;
    -- a request resolved or failed (a search may queue nothing): for `--wait` clients
    IF TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify('asyncsat_status', json_build_object(
            'request_id', NEW.id, 'request_status', NEW.status)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER request_notify AFTER INSERT OR UPDATE OF status ON request
    FOR EACH ROW EXECUTE FUNCTION asyncsat_notify_request();

-- Status changes of downloads: history row, wake-up of the daemon for queued
-- (and cancelled) rows, and an event for anyone waiting on a download.
CREATE OR REPLACE FUNCTION asyncsat_download_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO download_event (download_id, status, bytes_done, attempts, error)
        VALUES (NEW.id, NEW.status, NEW.bytes_done, NEW.attempts, NEW.error);
        IF NEW.status IN ('queued', 'cancelled') THEN
            PERFORM pg_notify('asyncsat', json_build_object(
                'type', 'download', 'id', NEW.id, 'status', NEW.status)::text);
        END IF;
        PERFORM pg_notify('asyncsat_status', json_build_object(
            'id', NEW.id, 'request_id', NEW.request_id, 'status', NEW.status)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER download_changed AFTER INSERT OR UPDATE OF status ON download
    FOR EACH ROW EXECUTE FUNCTION asyncsat_download_changed();

-- Providers and credentials size the connection slots.
CREATE OR REPLACE FUNCTION asyncsat_notify_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('asyncsat', json_build_object('type', 'accounts')::text);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER credential_notify AFTER INSERT OR UPDATE OR DELETE ON credential
    FOR EACH STATEMENT EXECUTE FUNCTION asyncsat_notify_accounts();
CREATE OR REPLACE TRIGGER provider_notify AFTER INSERT OR UPDATE OR DELETE ON provider
    FOR EACH STATEMENT EXECUTE FUNCTION asyncsat_notify_accounts();
