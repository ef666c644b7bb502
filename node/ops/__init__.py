"""Operations on a unit's node: backup and restore, rebuilding a lost store, reload, self-check."""
