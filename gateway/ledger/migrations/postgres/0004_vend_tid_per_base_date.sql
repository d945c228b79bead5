-- sts-gateway ledger, schema 4 (PostgreSQL): a TID is unique per meter *and base date*.
--
-- After a TID rollover (a key change to a later base date, RO = 1) a meter counts TIDs from the
-- new base date and clears its TID store, so a new TID may equal one vended under the old base
-- date. vends gets the base date each token was made under, and UNIQUE (meter, tid) becomes
-- UNIQUE (meter, base_date, tid). SQLite's 0004 keeps the same shape.
--
-- The base date of an existing vend: the old base date of the first rollover key change that a
-- later vend of the meter delivered; with none, the meter's base date now. (A key-change vend's
-- own credit token is under the new key, so it counts from the change's new base date.)

ALTER TABLE vends ADD COLUMN base_date INTEGER;

UPDATE vends v SET base_date = COALESCE(
    (SELECT kc.from_base_date
       FROM key_changes kc JOIN vends later ON later.purchase_id = kc.purchase_id
      WHERE kc.meter = v.meter AND kc.state = 'applied'
        AND kc.from_base_date <> kc.base_date AND later.vend_id > v.vend_id
      ORDER BY later.vend_id LIMIT 1),
    (SELECT m.base_date FROM meters m WHERE m.drn = v.meter)
);

ALTER TABLE vends ALTER COLUMN base_date SET NOT NULL;
ALTER TABLE vends DROP CONSTRAINT vends_meter_tid_key;
ALTER TABLE vends ADD CONSTRAINT vends_meter_base_date_tid_key UNIQUE (meter, base_date, tid);
