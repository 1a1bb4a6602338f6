"""``fewtune ui``: the web UI (fewtune.ui.app), its schema-generated training form and its training jobs."""
