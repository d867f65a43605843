"""The stages of a round, one module each: generate (with judging overlapped), judge,
select, update, checkpoint and evaluate. Each reads its inputs back on resume instead of redoing them."""
