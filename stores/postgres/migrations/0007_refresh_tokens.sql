-- Contract v2's refresh tokens. A refresh token is derived from the session id and its
-- generation under a key the database never holds, so the session keeps only the generation
-- whose token is the live one (a rotation moves it on by one) and when it last moved (a
-- used-up token that comes back just after is a client racing itself, not theft).
ALTER TABLE sessions
    ADD COLUMN refresh_generation integer     NOT NULL DEFAULT 0,
    ADD COLUMN refreshed_at       timestamptz,
    ADD CONSTRAINT sessions_refresh_generation_not_negative CHECK (refresh_generation >= 0);
