-- sts-gateway ledger, schema 4 (SQLite): a TID is unique per meter *and base date*.
--
-- After a TID rollover (a key change to a later base date, RO = 1) a meter counts TIDs from the
-- new base date and clears its TID store, so a new TID may equal one vended under the old base
-- date. vends gets the base date each token was made under, and UNIQUE (meter, tid) becomes
-- UNIQUE (meter, base_date, tid). PostgreSQL's 0004 keeps the same shape.
--
-- SQLite cannot alter a UNIQUE constraint, so the table is rebuilt (SQLite's documented
-- procedure: new table, copy, drop, rename). vends has no index, trigger or view of its own
-- besides its constraints' and no table references it; its foreign keys are re-declared below.
--
-- The base date of an existing vend: the old base date of the first rollover key change that a
-- later vend of the meter delivered; with none, the meter's base date now. (A key-change vend's
-- own credit token is under the new key, so it counts from the change's new base date.)

CREATE TABLE vends_0004 (
    vend_id            INTEGER PRIMARY KEY,
    purchase_id        TEXT NOT NULL UNIQUE REFERENCES purchases (purchase_id),
    meter              TEXT NOT NULL REFERENCES meters (drn),
    tid                INTEGER NOT NULL,
    token              TEXT NOT NULL CHECK (length(token) = 20),
    units              INTEGER NOT NULL CHECK (units > 0),
    receipt            TEXT,
    created_at         TEXT NOT NULL,
    key_change_tokens  TEXT NOT NULL DEFAULT '',
    base_date          INTEGER NOT NULL,
    UNIQUE (meter, base_date, tid)
);

INSERT INTO vends_0004 (vend_id, purchase_id, meter, tid, token, units, receipt, created_at,
                        key_change_tokens, base_date)
SELECT v.vend_id, v.purchase_id, v.meter, v.tid, v.token, v.units, v.receipt, v.created_at,
       v.key_change_tokens,
       COALESCE(
           (SELECT kc.from_base_date
              FROM key_changes kc JOIN vends later ON later.purchase_id = kc.purchase_id
             WHERE kc.meter = v.meter AND kc.state = 'applied'
               AND kc.from_base_date <> kc.base_date AND later.vend_id > v.vend_id
             ORDER BY later.vend_id LIMIT 1),
           (SELECT m.base_date FROM meters m WHERE m.drn = v.meter)
       )
  FROM vends v;

DROP TABLE vends;
ALTER TABLE vends_0004 RENAME TO vends;
