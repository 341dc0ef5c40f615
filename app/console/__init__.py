"""The web console: a static page and a few ES modules served at ``/console``, talking to the public API."""
