"""What the one-stop desk needs beyond intake: edits with If-Match, due dates, search."""
