"""What people read, from plain dicts: console tables and progress bars (console) and the
self-contained HTML pages (html). Reads no files."""
