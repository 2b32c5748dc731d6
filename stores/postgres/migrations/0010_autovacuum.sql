-- The purged tables lose as many rows as they gain, all day: the purge deletes what has aged
-- out as fast as commands insert. PostgreSQL's default autovacuum thresholds (a fifth of the
-- table dead, or a fifth inserted) would let each of them run for hours between vacuums, the
-- dead rows and their index entries growing meanwhile (BENCHMARKS.md, "What a deployment must
-- set"). At 2% a vacuum follows every half hour or so at the rates measured there, and the
-- tables stay within a few percent of their live size. ANALYZE follows at the same pace, so
-- the plans see the steady state.
ALTER TABLE idempotency SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE sessions SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE courier_outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
