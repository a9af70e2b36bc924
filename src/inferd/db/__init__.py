"""The database: the schema of every table (:mod:`.schema`), the engine (:mod:`.engine`) and
the migrations that build it (:mod:`.migrate`)."""
