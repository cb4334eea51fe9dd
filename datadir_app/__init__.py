"""Everything that walks the data dir's folders: reconciling rows with files (rescan,
verify), adopting the original service's folders, and session archives, with their
management commands."""
