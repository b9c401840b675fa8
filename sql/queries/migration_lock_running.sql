-- How many of this process's migration statements still run (query_id LIKE its
-- prefix): a KILL that matched none fails on a server with kill_throw_if_noop on.
SELECT count() FROM system.processes WHERE query_id LIKE {prefix:String}
