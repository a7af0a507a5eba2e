-- asyncsat schema: the one source of truth.
-- Applies cleanly to an empty database and again to an existing one
-- (every statement is idempotent). Needs PostgreSQL 15 or newer, no extension.

CREATE TABLE IF NOT EXISTS provider (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE
                CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    protocol    text NOT NULL,
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
    status      text NOT NULL DEFAULT 'queued',
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

-- 0.3: catalogs. A product is identified by the catalog's id when it has one, else by its
-- URL: a product two searches find is fetched once, even when its URL changes (pre-signed)
ALTER TABLE download ADD COLUMN IF NOT EXISTS product_id text;
-- times an offline product was looked at (its next look is `not_before`, later each time)
ALTER TABLE download ADD COLUMN IF NOT EXISTS offline_checks integer NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS download_url_unique;
CREATE UNIQUE INDEX IF NOT EXISTS download_product_unique
    ON download (provider_id, md5(coalesce('id:' || product_id, url)));

-- standing requests (`search --follow`): searched again every follow_interval from a
-- watermark (the newest publication or sensing time seen)
ALTER TABLE request ADD COLUMN IF NOT EXISTS follow boolean NOT NULL DEFAULT false;
ALTER TABLE request ADD COLUMN IF NOT EXISTS watermark timestamptz;
ALTER TABLE request ADD COLUMN IF NOT EXISTS next_run timestamptz;
ALTER TABLE request ADD COLUMN IF NOT EXISTS runs integer NOT NULL DEFAULT 0;
DO $$
BEGIN
    -- 0.3 adds the `following` status and the `dhus` protocol
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'request_status_v3') THEN
        ALTER TABLE request DROP CONSTRAINT IF EXISTS request_status_check;
        ALTER TABLE request ADD CONSTRAINT request_status_v3 CHECK
            (status IN ('queued', 'following', 'resolved', 'failed', 'cancelled'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'provider_protocol_v3') THEN
        ALTER TABLE provider DROP CONSTRAINT IF EXISTS provider_protocol_check;
        ALTER TABLE provider ADD CONSTRAINT provider_protocol_v3 CHECK
            (protocol IN ('http', 'ftp', 'odata', 'dhus', 'stac', 'm2m'));
    END IF;
END;
$$;

-- archived products: when this product was ordered from the long-term archive (never twice
-- while an order runs), and the wrong bytes last received (the same twice: bad at the source)
ALTER TABLE download ADD COLUMN IF NOT EXISTS ordered_at timestamptz;
ALTER TABLE download ADD COLUMN IF NOT EXISTS last_mismatch text;

-- every order sent to an archive, per account: the provider's quota (`archive_quota`,
-- such as 20 per 12 h) is counted here, so that a restart does not reset it
CREATE TABLE IF NOT EXISTS archive_order (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider_id bigint NOT NULL REFERENCES provider (id) ON DELETE CASCADE,
    account     text NOT NULL,
    download_id bigint REFERENCES download (id) ON DELETE SET NULL,
    ordered_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS archive_order_account_idx
    ON archive_order (provider_id, account, ordered_at);
-- an order the provider refused for its quota: the account sends none for a while
ALTER TABLE archive_order ADD COLUMN IF NOT EXISTS refused boolean NOT NULL DEFAULT false;

-- 0.6: the attempt that got as far as sealing its file (its body in, checked as still its
-- claim's: the file may then be renamed to its final name) and was not recorded done. Only
-- then is a file at the row's final name taken for its own by a later attempt (renamed
-- before a crash, never recorded done); else a file there is someone else's (a user's that
-- appeared after an attempt that failed early) and is never touched. Rows of an earlier
-- release that ran an attempt may have: they keep adopting, as they did.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'download'
                     AND column_name = 'sealed_attempt') THEN
        ALTER TABLE download ADD COLUMN sealed_attempt integer;
        UPDATE download SET sealed_attempt = attempts
         WHERE status <> 'done' AND attempts > 0;
    END IF;
END;
$$;

-- what the claim reads: due rows of a provider, queued or offline (to be looked at again)
DROP INDEX IF EXISTS download_queued_idx;
CREATE INDEX IF NOT EXISTS download_due_idx
    ON download (provider_id, not_before, id) WHERE status IN ('queued', 'offline');
CREATE INDEX IF NOT EXISTS request_following_idx
    ON request (next_run) WHERE status = 'following';
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
-- 0.4: the folder a request wants a product in when its download fetches it into another
-- one (a product is fetched once): the daemon hard-links (else copies) the file there once
-- it is done, then clears it
ALTER TABLE request_download ADD COLUMN IF NOT EXISTS dest text;
-- 0.5: the requests of a download (the key leads by request): the copies owed when it is
-- done, the requests `status` lists as unfinished, and the cascade when downloads are
-- deleted were each a scan of every link (36 ms a lookup with 1,000,000 links)
CREATE INDEX IF NOT EXISTS request_download_download_idx ON request_download (download_id);
-- 0.5: `status --status S` pages (newest first, by keyset) and counts the downloads of a
-- status as an index range, however few they are and however old (proven by EXPLAIN in
-- tests/integration/test_plans.py)
CREATE INDEX IF NOT EXISTS download_status_idx ON download (status, id);

-- 9: a credential's secret kept out of the database: `env:NAME` or `file:PATH` (first line),
-- read by each daemon where it runs (`secret` is then empty): `credential add
-- --password-ref`
ALTER TABLE credential ADD COLUMN IF NOT EXISTS secret_ref text;
DO $$ BEGIN
    ALTER TABLE credential ADD CONSTRAINT credential_secret_ref_check
        CHECK (secret_ref ~ '^(env|file):.');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- 0.4: a paused provider starts no transfer (running ones finish); `provider pause NAME`,
-- or plain `UPDATE provider SET paused = true`: the provider_notify trigger tells the daemon
ALTER TABLE provider ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false;
-- 0.4: bytes per second of a running transfer over its last seconds, written by the daemon
-- with bytes_done (`status` and `get --wait` show rates and times left from it)
ALTER TABLE download ADD COLUMN IF NOT EXISTS rate double precision;

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

-- a heartbeat renewing a download's lease is no change of the row (its progress, and so a
-- stalled transfer, must not look fresh)
CREATE OR REPLACE FUNCTION asyncsat_touch_download() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.lease_expires IS DISTINCT FROM OLD.lease_expires AND NEW.status = OLD.status
            AND NEW.bytes_done = OLD.bytes_done THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER request_touch BEFORE UPDATE ON request
    FOR EACH ROW EXECUTE FUNCTION asyncsat_touch();
CREATE OR REPLACE TRIGGER download_touch BEFORE UPDATE ON download
    FOR EACH ROW EXECUTE FUNCTION asyncsat_touch_download();
CREATE OR REPLACE TRIGGER credential_touch BEFORE UPDATE ON credential
    FOR EACH ROW EXECUTE FUNCTION asyncsat_touch();

-- New requests wake the daemon.
CREATE OR REPLACE FUNCTION asyncsat_notify_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('queued', 'following') OR (TG_OP = 'UPDATE' AND
            NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled') THEN
        PERFORM pg_notify('asyncsat', json_build_object(
            'type', 'request', 'id', NEW.id, 'status', NEW.status)::text);
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
-- (and cancelled) rows, and a wake-up for the `--wait` clients of a request when one of its
-- downloads ends. The payloads carry what their listeners use and no more: PostgreSQL
-- delivers identical notifications of one transaction once, so 2,000 rows queued by one
-- `get` wake a daemon once, not 2,000 times, and the rows ended by one statement (done
-- together, or cancelled with their request) wake a waiting client once. A cancelled row
-- is named: the daemon stops its transfer.
CREATE OR REPLACE FUNCTION asyncsat_download_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO download_event (download_id, status, bytes_done, attempts, error)
        VALUES (NEW.id, NEW.status, NEW.bytes_done, NEW.attempts, NEW.error);
        IF NEW.status = 'queued' THEN
            PERFORM pg_notify('asyncsat', '{"type": "download", "status": "queued"}');
        ELSIF NEW.status = 'cancelled' THEN
            PERFORM pg_notify('asyncsat', json_build_object(
                'type', 'download', 'id', NEW.id, 'status', NEW.status)::text);
        END IF;
        IF NEW.status IN ('done', 'failed', 'cancelled', 'offline') THEN  -- (models.TERMINAL)
            PERFORM pg_notify('asyncsat_status', json_build_object(
                'request_id', NEW.request_id)::text);
        END IF;
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

-- A product is ready: `LISTEN asyncsat_done` wakes the application that uses the files the
-- way `asyncsat` wakes the daemon. The payload is JSON (NOTIFY payloads stay under 8000
-- bytes: no URL, which may be a long pre-signed one).
CREATE OR REPLACE FUNCTION asyncsat_notify_done() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_payload text;
BEGIN
    IF NEW.status = 'done' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'done') THEN
        -- (a product that hundreds of requests asked for: the first 200 of them, and
        -- "request_ids_truncated": true; all of them would not fit the payload, and the
        -- row could never be recorded done)
        v_ids := ARRAY(SELECT request_id FROM request_download WHERE download_id = NEW.id
                        ORDER BY request_id LIMIT 201);
        v_payload := json_build_object(
            'download_id', NEW.id,
            'request_id', NEW.request_id,
            'request_ids', to_json(v_ids[1:200]),
            'provider', (SELECT name FROM provider WHERE id = NEW.provider_id),
            'name', NEW.name,
            'path', NEW.path,
            'size', NEW.size,
            'checksum', CASE WHEN NEW.checksum_algo IS NOT NULL
                        THEN NEW.checksum_algo || ':' || NEW.checksum_value END)::text;
        IF cardinality(v_ids) > 200 THEN
            v_payload := (v_payload::jsonb || '{"request_ids_truncated": true}')::text;
        END IF;
        PERFORM pg_notify('asyncsat_done', v_payload);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER download_done_notify AFTER INSERT OR UPDATE OF status ON download
    FOR EACH ROW EXECUTE FUNCTION asyncsat_notify_done();

-- 0.4: several daemons on one database. Each daemon has a row and a heartbeat; every
-- request sent for an account (a transfer, a listing, a search) holds a lease on one of the
-- account's slots, renewed by the heartbeat. An account's cap is its live leases, counted
-- here across all daemons; a download whose owner stopped renewing is taken over.
CREATE TABLE IF NOT EXISTS daemon (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    version       text NOT NULL,
    lease_timeout double precision NOT NULL,
    -- boot id and pid namespace: a pid means something only within the same ones
    machine       text NOT NULL DEFAULT '',
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz
);

CREATE TABLE IF NOT EXISTS lease (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    daemon_id   text NOT NULL REFERENCES daemon (id) ON DELETE CASCADE,
    provider_id bigint NOT NULL REFERENCES provider (id) ON DELETE CASCADE,
    -- `credential:<id>`, `anonymous`
    account     text NOT NULL,
    download_id bigint REFERENCES download (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_account_idx ON lease (provider_id, account, expires_at);
CREATE INDEX IF NOT EXISTS lease_daemon_idx ON lease (daemon_id);

-- the daemon resolving a request (a search or a listing, over the network) and until when:
-- the other daemons leave it alone meanwhile; its heartbeat renews it, a dead daemon's lapses
ALTER TABLE request ADD COLUMN IF NOT EXISTS resolver text;
ALTER TABLE request ADD COLUMN IF NOT EXISTS resolving_until timestamptz;

-- who works a running download, and until when its lease holds
ALTER TABLE download ADD COLUMN IF NOT EXISTS owner text;
ALTER TABLE download ADD COLUMN IF NOT EXISTS lease_expires timestamptz;
-- rows left running by a daemon of an earlier release: taken over at once
UPDATE download SET lease_expires = now() WHERE status = 'running' AND lease_expires IS NULL;
-- (ordered as the claim takes rows over: by lease expiry, then id; 0.4 had no id in it)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_indexes WHERE indexname = 'download_running_idx'
               AND indexdef NOT LIKE '%lease_expires, id)%') THEN
        DROP INDEX download_running_idx;
    END IF;
END;
$$;
CREATE INDEX IF NOT EXISTS download_running_idx
    ON download (provider_id, lease_expires, id) WHERE status = 'running';
-- when the next queued row is due, and the next offline one to be looked at: a probe each
-- (in download_due_idx, the rows of the other status would be read past one by one)
CREATE INDEX IF NOT EXISTS download_wait_idx
    ON download (provider_id, status, not_before) WHERE status IN ('queued', 'offline');

-- The accounts of a provider and the connections each allows: its enabled credentials,
-- else one anonymous account (`max_connections` setting, default 4).
CREATE OR REPLACE FUNCTION asyncsat_accounts(p_provider bigint)
RETURNS TABLE (account text, cap integer) LANGUAGE sql STABLE AS $$
    SELECT 'credential:' || c.id, c.max_connections FROM credential c
     WHERE c.provider_id = p_provider AND c.enabled
    UNION ALL
    SELECT 'anonymous',
           CASE WHEN jsonb_typeof(p.settings -> 'max_connections') = 'number'
                 AND (p.settings ->> 'max_connections')::numeric >= 1
                THEN least(floor((p.settings ->> 'max_connections')::numeric), 10000)::int
                ELSE 4 END
      FROM provider p
     WHERE p.id = p_provider
       AND NOT EXISTS (SELECT 1 FROM credential c WHERE c.provider_id = p_provider AND c.enabled)
$$;

-- Daemons waiting for a slot of a provider for a listing or a search (asyncsat_take_lease
-- found none): while one waits, a transfer's slot is given back rather than handed on to
-- the next file, and claims leave it the slots that free. A row is refreshed at every try
-- (every 2 s at most); one older than 10 s is a waiter that gave up or died.
CREATE TABLE IF NOT EXISTS lease_wait (
    daemon_id   text NOT NULL REFERENCES daemon (id) ON DELETE CASCADE,
    provider_id bigint NOT NULL REFERENCES provider (id) ON DELETE CASCADE,
    wanted_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, daemon_id)
);

CREATE OR REPLACE FUNCTION asyncsat_waiting(p_provider bigint) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT count(*)::int FROM lease_wait
             WHERE provider_id = p_provider AND wanted_at > now() - interval '10 seconds');
END;
$$;

-- Take one slot of a provider's accounts (the least loaded with room) for `p_seconds`;
-- no row when every account is full. Takers of one provider queue on its row, so two
-- daemons never both take the last slot.
CREATE OR REPLACE FUNCTION asyncsat_take_lease(
    p_daemon text, p_provider bigint, p_seconds double precision)
RETURNS TABLE (lease_id bigint, account text) LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
BEGIN
    -- a claim waits a moment for another daemon's, never for a stuck one
    PERFORM set_config('lock_timeout', '5s', true);
    -- (NO KEY: inserts of download and lease rows, which share the provider's key, go on)
    PERFORM 1 FROM provider WHERE id = p_provider FOR NO KEY UPDATE;
    SELECT a.account INTO v_account
      FROM asyncsat_accounts(p_provider) a,
           LATERAL (SELECT count(*) AS used FROM lease l WHERE l.provider_id = p_provider
                     AND l.account = a.account AND l.expires_at > now()) u
     WHERE u.used < a.cap
     ORDER BY u.used::float8 / a.cap, a.cap DESC, a.account LIMIT 1;
    IF v_account IS NULL THEN
        INSERT INTO lease_wait (daemon_id, provider_id) VALUES (p_daemon, p_provider)
            ON CONFLICT (provider_id, daemon_id) DO UPDATE SET wanted_at = now();
        RETURN;
    END IF;
    DELETE FROM lease_wait WHERE provider_id = p_provider AND daemon_id = p_daemon;
    RETURN QUERY
        INSERT INTO lease (daemon_id, provider_id, account, expires_at)
        VALUES (p_daemon, p_provider, v_account, now() + make_interval(secs => p_seconds))
        RETURNING lease.id, lease.account;
END;
$$;

-- What a claim returns: the claimed row as the claim left it (a claim is one round trip),
-- how it was found (`running`: taken over; `queued`; `offline`), its account and lease.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'asyncsat_claimed') THEN
        CREATE TYPE asyncsat_claimed AS (
            download_id bigint, claimed_from text, account text, lease_id bigint,
            request_id bigint, provider_id bigint, provider text, url text, name text,
            dest text, size bigint, checksum_algo text, checksum_value text, status text,
            bytes_done bigint, attempts integer, failures integer, error text, path text,
            etag text, last_modified text, login_user text, login_secret text,
            size_origin text, product_id text, offline_checks integer,
            ordered_at timestamptz, last_mismatch text);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'asyncsat_claimed'::regclass
                   AND attname = 'sealed_attempt') THEN
        ALTER TYPE asyncsat_claimed ADD ATTRIBUTE sealed_attempt integer;
    END IF;
    -- (an earlier hand-over took no current download)
    DROP FUNCTION IF EXISTS asyncsat_hand_over(text, bigint, double precision, text, boolean);
    -- (0.4's claim returned four columns: a changed result type needs a new function)
    IF EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'asyncsat_claim'
               AND pg_get_function_result(oid) <> 'SETOF asyncsat_claimed') THEN
        DROP FUNCTION asyncsat_claim(text, bigint, integer, double precision, text);
    END IF;
END;
$$;

-- The next rows of a provider to claim, locked for this transaction: rows whose owner
-- stopped renewing its lease first (taken over), then queued rows and offline ones due for
-- a look, oldest first; each in index order (download_running_idx, download_due_idx).
CREATE OR REPLACE FUNCTION asyncsat_due(p_daemon text, p_provider bigint, p_limit integer)
RETURNS TABLE (id bigint, was text) LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
        WITH taken_over AS (
            SELECT d.id, 'running'::text AS was, 0 AS rank, d.lease_expires AS due
              FROM download d
             WHERE d.provider_id = p_provider AND d.status = 'running'
               AND d.lease_expires <= now() AND d.owner IS DISTINCT FROM p_daemon
             ORDER BY d.lease_expires, d.id LIMIT p_limit FOR UPDATE SKIP LOCKED),
        due AS (
            SELECT d.id, d.status AS was, 1 AS rank, d.not_before AS due FROM download d
             WHERE d.provider_id = p_provider AND d.status IN ('queued', 'offline')
               AND d.not_before <= now()
             ORDER BY d.not_before, d.id LIMIT p_limit FOR UPDATE SKIP LOCKED)
        SELECT x.id, x.was FROM (SELECT * FROM taken_over UNION ALL SELECT * FROM due) x
         ORDER BY x.rank, x.due, x.id LIMIT p_limit;
END;
$$;

-- One row (locked by asyncsat_due) becomes this daemon's, in a slot it holds (a lease):
-- running, one more attempt, an owner and a lease expiry. A row inserted without a
-- destination gets the daemon's default, so that the unique file index sees the folder it
-- is really written to. (Looking at an offline product again uses no attempt: it is given
-- back when the product is still offline; a row taken over keeps its folder and name.)
CREATE OR REPLACE FUNCTION asyncsat_take(
    p_daemon text, p_lease bigint, p_account text, p_row bigint, p_was text,
    p_seconds double precision, p_default_dest text)
RETURNS SETOF asyncsat_claimed LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
        UPDATE download d SET status = 'running', attempts = d.attempts + 1, owner = p_daemon,
               lease_expires = now() + make_interval(secs => p_seconds), rate = NULL,
               started_at = now(), finished_at = NULL, dest = coalesce(d.dest, p_default_dest),
               -- a row inserted with a name and no dest: another product of the default
               -- folder may have that name; the transfer then picks `name_<id>`
               name = CASE WHEN d.dest IS NULL AND EXISTS (
                   SELECT 1 FROM download o WHERE o.provider_id = d.provider_id
                   AND o.id <> d.id AND coalesce(o.dest, '') = p_default_dest
                   AND o.name = d.name) THEN NULL ELSE d.name END
          FROM provider p
         WHERE d.id = p_row AND p.id = d.provider_id
        RETURNING d.id, p_was, p_account, p_lease, d.request_id, d.provider_id, p.name, d.url,
                  d.name, d.dest, d.size, d.checksum_algo, d.checksum_value, d.status,
                  d.bytes_done, d.attempts, d.failures, d.error, d.path, d.etag,
                  d.last_modified, d.login_user, d.login_secret, d.size_origin, d.product_id,
                  d.offline_checks, d.ordered_at, d.last_mismatch, d.sealed_attempt;
END;
$$;

-- Claim due downloads of a provider into its free slots, across all daemons (asyncsat_due
-- picks them): each gets a lease on the least loaded account with room.
CREATE OR REPLACE FUNCTION asyncsat_claim(
    p_daemon text, p_provider bigint, p_limit integer, p_seconds double precision,
    p_default_dest text)
RETURNS SETOF asyncsat_claimed LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_accounts text[];
    v_caps integer[];
    v_used integer[];
    v_room integer;
    v_best integer;
    v_row record;
    v_lease bigint;
BEGIN
    -- a claim waits a moment for another daemon's, never for a stuck one
    PERFORM set_config('lock_timeout', '5s', true);
    -- (NO KEY: inserts of download and lease rows, which share the provider's key, go on)
    PERFORM 1 FROM provider WHERE id = p_provider FOR NO KEY UPDATE;
    IF EXISTS (SELECT 1 FROM provider WHERE id = p_provider AND paused) THEN
        RETURN;  -- a paused provider starts no transfer; running ones finish
    END IF;
    -- lapsed leases go, but never one a hand-over holds: it locked the lease before it
    -- lapsed and asks for this provider's row next, which this claim holds (a deadlock)
    DELETE FROM lease WHERE id IN (
        SELECT id FROM lease WHERE provider_id = p_provider AND expires_at <= now()
           FOR UPDATE SKIP LOCKED);
    SELECT array_agg(a.account ORDER BY a.account), array_agg(a.cap ORDER BY a.account),
           array_agg((SELECT count(*)::int FROM lease l WHERE l.provider_id = p_provider
                        AND l.account = a.account) ORDER BY a.account)
      INTO v_accounts, v_caps, v_used
      FROM asyncsat_accounts(p_provider) a;
    IF v_accounts IS NULL THEN
        RETURN;
    END IF;
    v_room := 0;
    FOR i IN 1 .. array_length(v_accounts, 1) LOOP
        v_room := v_room + greatest(0, v_caps[i] - v_used[i]);
    END LOOP;
    -- (the slots a listing or a search waits for are left to it)
    v_room := least(v_room - asyncsat_waiting(p_provider), p_limit);
    IF v_room <= 0 THEN
        RETURN;
    END IF;
    FOR v_row IN SELECT * FROM asyncsat_due(p_daemon, p_provider, v_room) LOOP
        v_best := NULL;
        FOR i IN 1 .. array_length(v_accounts, 1) LOOP
            IF v_used[i] < v_caps[i] AND (v_best IS NULL OR
                    v_used[i]::float8 / v_caps[i] < v_used[v_best]::float8 / v_caps[v_best]) THEN
                v_best := i;
            END IF;
        END LOOP;
        v_used[v_best] := v_used[v_best] + 1;
        INSERT INTO lease (daemon_id, provider_id, account, download_id, expires_at)
        VALUES (p_daemon, p_provider, v_accounts[v_best], v_row.id,
                now() + make_interval(secs => p_seconds))
        RETURNING id INTO v_lease;
        RETURN QUERY SELECT * FROM asyncsat_take(p_daemon, v_lease, v_accounts[v_best],
                                                 v_row.id, v_row.was, p_seconds,
                                                 p_default_dest);
    END LOOP;
END;
$$;

-- A transfer's body is in and its connection given back: its slot goes straight to the
-- provider's next due row, claimed here (one statement instead of a release, a wake-up of
-- every daemon and a claim). Unless `p_next` is false, the lease lapsed or is no longer
-- `p_current`'s (a repeated call hands nothing over twice), the provider is paused, its
-- account is gone or over its cap (max_connections lowered), a listing or a search waits
-- for a slot of the provider, or this daemon holds its share of the account already (the
-- account's cap divided among the live daemons: the others get the slots it lets go); the
-- lease then ends. With `p_more`, up to that many due rows after the next one are claimed
-- too: a run, which the slot takes in turn over its one connection (small files: one
-- statement for several); the lease is then the run's last row's, whose own hand-over
-- passes the slot on (the others' find it no longer theirs: they hand nothing over).
CREATE OR REPLACE FUNCTION asyncsat_hand_over(
    p_daemon text, p_lease bigint, p_current bigint, p_seconds double precision,
    p_default_dest text, p_next boolean, p_more integer)
RETURNS SETOF asyncsat_claimed LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease record;
    v_cap integer;
    v_used integer;
    v_mine integer;
    v_daemons integer;
    v_row record;
    v_rows bigint[] := '{}';
BEGIN
    PERFORM set_config('lock_timeout', '5s', true);
    -- (locked: a claim's sweep of lapsed leases cannot delete it under this statement)
    SELECT * INTO v_lease FROM lease
     WHERE id = p_lease AND daemon_id = p_daemon AND download_id = p_current
       AND expires_at > now() FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;  -- lapsed (another daemon may count the slot free), or handed over already
    END IF;
    -- the row's file is renamed next: this attempt may have renamed it from now on (a
    -- daemon of the previous release seals through here without saying so: a file it
    -- renamed before it died is then adopted by the daemon that takes the row over, not
    -- fetched again under another name; this release's own sealing marked it already)
    UPDATE download SET sealed_attempt = attempts
     WHERE id = p_current AND status = 'running' AND owner = p_daemon
       AND lease_expires > now() AND sealed_attempt IS DISTINCT FROM attempts;
    IF p_next THEN
        -- SHARE: a `provider pause` waits for this statement, or this one sees the pause;
        -- hand-overs do not wait for each other (claims, rare once slots run, do)
        PERFORM 1 FROM provider WHERE id = v_lease.provider_id AND NOT paused FOR SHARE;
        IF FOUND AND asyncsat_waiting(v_lease.provider_id) = 0 THEN
            SELECT a.cap INTO v_cap FROM asyncsat_accounts(v_lease.provider_id) a
             WHERE a.account = v_lease.account;
            SELECT count(*), count(*) FILTER (WHERE l.daemon_id = p_daemon)
              INTO v_used, v_mine FROM lease l
             WHERE l.provider_id = v_lease.provider_id AND l.account = v_lease.account
               AND l.expires_at > now();
            SELECT count(*) INTO v_daemons FROM daemon
             WHERE stopped_at IS NULL
               AND heartbeat_at > now() - make_interval(secs => lease_timeout);
            IF v_used <= v_cap AND v_mine <= ceil(v_cap::float8 / greatest(v_daemons, 1)) THEN
                -- the next row, and up to p_more after it (a run: the slot takes them in
                -- turn, the lease is the last one's, which hands it over or gives it back)
                FOR v_row IN SELECT * FROM asyncsat_due(p_daemon, v_lease.provider_id,
                                                        1 + greatest(p_more, 0)) LOOP
                    v_rows := v_rows || v_row.id;
                    RETURN QUERY SELECT * FROM asyncsat_take(
                        p_daemon, p_lease, v_lease.account, v_row.id, v_row.was, p_seconds,
                        p_default_dest);
                END LOOP;
                IF cardinality(v_rows) > 0 THEN
                    UPDATE lease SET download_id = v_rows[cardinality(v_rows)],
                           expires_at = now() + make_interval(secs => p_seconds)
                     WHERE id = p_lease;
                    RETURN;
                END IF;
            END IF;
        END IF;
    END IF;
    DELETE FROM lease WHERE id = p_lease;
END;
$$;

-- Schema 4's hand-over (no runs), for its daemons still running while a fleet is upgraded.
CREATE OR REPLACE FUNCTION asyncsat_hand_over(
    p_daemon text, p_lease bigint, p_current bigint, p_seconds double precision,
    p_default_dest text, p_next boolean)
RETURNS SETOF asyncsat_claimed LANGUAGE sql AS $$
    SELECT * FROM asyncsat_hand_over(p_daemon, p_lease, p_current, p_seconds, p_default_dest,
                                     p_next, 0)
$$;

-- What the server told at the start of a file, recorded while the row is still its claim's:
-- the first of `p_names` that no other download of the folder has (the unique file index
-- decides), its size (one a catalog or a user gave stays) and validators. Returns the name,
-- '' when every one is taken, NULL when the row is no longer the claim's.
-- With `p_sealing` (a file held whole, its body in: it is renamed next), the row records
-- that this attempt may have renamed its file (`sealed_attempt`), in the same update.
DROP FUNCTION IF EXISTS asyncsat_named(bigint, text, integer, text[], bigint, text, text);
CREATE OR REPLACE FUNCTION asyncsat_named(
    p_id bigint, p_owner text, p_attempt integer, p_names text[], p_size bigint,
    p_etag text, p_last_modified text, p_sealing boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_name text;
    v_index text;
BEGIN
    FOREACH v_name IN ARRAY p_names LOOP
        BEGIN
            UPDATE download SET name = v_name, etag = p_etag, last_modified = p_last_modified,
                   size = CASE WHEN size IS NULL OR size_origin = 'server'
                               THEN coalesce(p_size, size) ELSE size END,
                   size_origin = CASE WHEN size IS NULL THEN 'server' ELSE size_origin END,
                   sealed_attempt = CASE WHEN p_sealing THEN p_attempt ELSE sealed_attempt END
             WHERE id = p_id AND status = 'running' AND owner = p_owner
               AND attempts = p_attempt;
            IF NOT FOUND THEN
                RETURN NULL;
            END IF;
            RETURN v_name;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS v_index = CONSTRAINT_NAME;
            IF v_index <> 'download_file_unique' THEN
                RAISE;
            END IF;  -- another download of the folder has that name: the next one
        END;
    END LOOP;
    RETURN '';
END;
$$;

-- A streamed file's body is in (checked as still its claim's): it may be renamed from now
-- on (`sealed_attempt`). The seconds its lease has left; NULL when the row is no longer the
-- claim's.
CREATE OR REPLACE FUNCTION asyncsat_sealing(p_id bigint, p_owner text, p_attempt integer)
RETURNS double precision LANGUAGE sql AS $$
    UPDATE download SET sealed_attempt = p_attempt
     WHERE id = p_id AND status = 'running' AND owner = p_owner AND attempts = p_attempt
    RETURNING extract(epoch FROM lease_expires - now())::float8
$$;

-- The bodies of rows of a run that hand no slot over (the run's last row does): for each,
-- whether it is still its claim's, and how long its lease has left (its file gets its final
-- name only within it); a file held whole in memory records its name, size and validators
-- too (`asyncsat_named`, with its name or `p_others`'s when another download of the folder
-- has it). Several in one statement, as `asyncsat_done` records them: rows another
-- transaction holds are skipped, never waited for while others are held; the daemon then
-- seals each alone with `p_wait`, which waits for that one row (5 s at most). Returns each
-- row sealed that is still its claim's.
CREATE OR REPLACE FUNCTION asyncsat_sealed(
    p_ids bigint[], p_owners text[], p_attempts integer[], p_names text[], p_others text[],
    p_sizes bigint[], p_etags text[], p_last_modified text[], p_wait boolean)
RETURNS TABLE (sealed_id bigint, lease_left double precision, named text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v record;
BEGIN
    IF p_wait THEN  -- (one record)
        PERFORM set_config('lock_timeout', '5s', true);
        PERFORM 1 FROM download WHERE id = p_ids[1] FOR UPDATE;
    END IF;
    FOR v IN
        SELECT u.*, extract(epoch FROM d.lease_expires - now())::float8 AS left_s
          FROM unnest(p_ids, p_owners, p_attempts, p_names, p_others, p_sizes, p_etags,
                      p_last_modified) AS u (id, owner, attempt, name, other, size, etag, lm)
          JOIN download d ON d.id = u.id
         WHERE d.status = 'running' AND d.owner = u.owner AND d.attempts = u.attempt
         ORDER BY u.id
           FOR UPDATE OF d SKIP LOCKED  -- (not the row locked just above)
    LOOP
        sealed_id := v.id;
        lease_left := v.left_s;
        IF v.name IS NOT NULL THEN
            named := asyncsat_named(v.id, v.owner, v.attempt, ARRAY[v.name, v.other], v.size,
                                    v.etag, v.lm, true);
        ELSE
            named := NULL;
            PERFORM asyncsat_sealing(v.id, v.owner, v.attempt);
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Files at their final path recorded done, several in one statement (the daemon gathers
-- the files that end within a few milliseconds: one commit for them). A row is written only
-- while it is still its claim's (status running, owner and attempt); one the user cancelled
-- meanwhile stays cancelled, its claim ended (no owner), and is not returned. Rows another
-- transaction holds are skipped, never waited for while others are held (a cycle with a
-- statement that locks several rows in another order would be a deadlock); the daemon then
-- records each alone with `p_wait`, which waits for that one row (5 s at most: a row held
-- longer fails with lock_not_available, and the daemon looks at it again). A row this attempt
-- already ended counts as recorded: the same call again, after its answer was lost. Returns
-- each row recorded, with the copies owed to other requests' folders.
CREATE OR REPLACE FUNCTION asyncsat_done(
    p_ids bigint[], p_owners text[], p_attempts integer[], p_sizes bigint[], p_paths text[],
    p_wait boolean)
RETURNS TABLE (done_id bigint, owed_requests bigint[], owed_folders text[])
-- (generic plans: with its arrays a custom plan looked cheaper, and planning it again at
-- every call cost twice the statement)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF p_wait THEN  -- (one record: found by its key whatever the statistics)
        PERFORM set_config('lock_timeout', '5s', true);
        PERFORM 1 FROM download WHERE id = p_ids[1] FOR NO KEY UPDATE;
    END IF;
    RETURN QUERY
        WITH v AS (SELECT * FROM unnest(p_ids, p_owners, p_attempts, p_sizes, p_paths)
                                 AS v (id, owner, attempt, size, path)),
        -- (the status as locked: a cancel that committed since the statement began)
        mine AS (SELECT d.id, d.status FROM download d JOIN v ON v.id = d.id
                    AND d.id = ANY(p_ids) AND d.status IN ('running', 'cancelled')
                    AND d.owner = v.owner AND d.attempts = v.attempt
                  FOR NO KEY UPDATE OF d SKIP LOCKED),  -- (not the rows locked just above)
        done AS (UPDATE download d SET status = 'done', bytes_done = v.size, size = v.size,
                        path = v.path, error = NULL, failures = 0, finished_at = now(),
                        owner = NULL, sealed_attempt = NULL
                   FROM v WHERE d.id = v.id
                    AND d.id IN (SELECT id FROM mine WHERE status = 'running')
                    AND d.status = 'running' AND d.owner = v.owner AND d.attempts = v.attempt
                 RETURNING d.id),
        -- a row the user cancelled under its transfer stays cancelled, not done; its claim
        -- ends all the same, as a stopped transfer's does: no owner (its mark stays: the
        -- file at its final name is this attempt's, which a retry adopts)
        cancelled AS (UPDATE download d SET owner = NULL
                       WHERE d.id IN (SELECT id FROM mine WHERE status = 'cancelled')),
        -- (only the claim that sealed the file can have ended the row done with this
        -- attempt number; a look at an offline product gives its number back to the next
        -- claim, but never ends done)
        -- (one key lookup per record, whatever the statistics say of the rows done: they
        -- are most of the table, and a plan built when there were few would hash them all)
        before AS (SELECT v.id FROM v, LATERAL (
                      SELECT d.status, d.attempts, d.path FROM download d WHERE d.id = v.id
                      OFFSET 0) d
                    WHERE d.status = 'done' AND d.attempts = v.attempt AND d.path = v.path)
        SELECT x.id,
               array(SELECT rd.request_id FROM request_download rd
                      WHERE rd.download_id = x.id AND rd.dest IS NOT NULL
                      ORDER BY rd.request_id),
               array(SELECT rd.dest FROM request_download rd
                      WHERE rd.download_id = x.id AND rd.dest IS NOT NULL
                      ORDER BY rd.request_id)
          FROM (SELECT id FROM done UNION ALL SELECT id FROM before) x;
END;
$$;

-- A slot freed (a lease ended) wakes the daemons waiting for one.
CREATE OR REPLACE FUNCTION asyncsat_lease_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('asyncsat', json_build_object(
        'type', 'slot', 'provider_id', OLD.provider_id)::text);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER lease_freed AFTER DELETE ON lease
    FOR EACH ROW EXECUTE FUNCTION asyncsat_lease_freed();

-- The schema's version, raised with every change of this file: a daemon does not start on an
-- older one (`asyncsat init` upgrades it), and `asyncsat init` of a release never applies this
-- file to a newer one.
CREATE TABLE IF NOT EXISTS asyncsat_schema (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL
);
INSERT INTO asyncsat_schema (version) VALUES (9)
    ON CONFLICT (one) DO UPDATE SET version = greatest(asyncsat_schema.version, EXCLUDED.version);
