"""Everything that knows SQL: the ORM tables, engines and sessions, and the migration runner."""
