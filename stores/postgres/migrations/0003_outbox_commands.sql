-- The outbox knows which rows one command wrote, so that relays claim whole commands and
-- publish a command's events in order (docs/contract.md, "Ordering").
--
-- `outbox.command_seq` is shared by the rows of one command (RECORD_OUTCOME draws one number
-- per statement). `outbox_pending` has a row per command with unpublished rows: what a relay
-- locks (FOR UPDATE SKIP LOCKED) to hold the whole command, and how far it is published: rows
-- before `next_seq` are, and none after `last_seq` belongs to it. A relay that publishes a
-- prefix moves `next_seq` on, and deletes the row once the command is published.
--
-- Nothing here reads or rewrites the whole outbox: the column is added without a default,
-- and the claim reaches a command's rows through the primary key (seq between next_seq and
-- last_seq), so no new index over the table is needed. Rows published before this migration
-- keep a NULL command_seq; nothing claims them again.
CREATE SEQUENCE outbox_command_seq AS bigint;
ALTER TABLE outbox ADD COLUMN command_seq bigint;
ALTER SEQUENCE outbox_command_seq OWNED BY outbox.command_seq;

CREATE TABLE outbox_pending (
    command_seq bigint NOT NULL,
    next_seq    bigint NOT NULL,
    last_seq    bigint NOT NULL,
    CONSTRAINT outbox_pending_pkey PRIMARY KEY (command_seq)
);

-- A row written without a command_seq (by a worker of the previous version, during a rolling
-- upgrade) is a command of its own, so that the relays of this version publish it too.
CREATE FUNCTION outbox_row_without_command() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.command_seq := nextval('outbox_command_seq');
    INSERT INTO outbox_pending (command_seq, next_seq, last_seq)
    VALUES (NEW.command_seq, NEW.seq, NEW.seq);
    RETURN NEW;
END
$$;
CREATE TRIGGER outbox_row_without_command BEFORE INSERT ON outbox
    FOR EACH ROW WHEN (NEW.command_seq IS NULL) EXECUTE FUNCTION outbox_row_without_command();

-- Rows still unpublished now, written before commands were known: one command each, numbered
-- in outbox order (a volatile function in the select list is evaluated after the sort).
WITH numbered AS (
    SELECT seq, nextval('outbox_command_seq') AS command_seq
    FROM outbox WHERE published_at IS NULL
    ORDER BY seq
),
updated AS (
    UPDATE outbox SET command_seq = numbered.command_seq
    FROM numbered WHERE outbox.seq = numbered.seq
)
INSERT INTO outbox_pending (command_seq, next_seq, last_seq)
SELECT command_seq, seq, seq FROM numbered;
