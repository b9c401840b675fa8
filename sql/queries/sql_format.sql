-- A query sent to the SQL endpoint as ClickHouse formats it on one line (parsed only,
-- never run): every quoted name comes back in backquotes with its escapes, which
-- sql/sqlnames.py check_names reads.
SELECT formatQuerySingleLine({query:String})
