-- Contract v2's account shape: whether the email address was proven to belong to its
-- holder, whether an operator disabled the account, and its roles (sorted, unique names).
ALTER TABLE accounts
    ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN status         text    NOT NULL DEFAULT 'active',
    ADD COLUMN roles          text[]  NOT NULL DEFAULT '{}',
    ADD CONSTRAINT accounts_status_known CHECK (status IN ('active', 'disabled'));
