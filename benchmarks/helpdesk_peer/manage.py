#!/usr/bin/env python
"""manage.py of the minimal Django project that runs django-helpdesk for email_import.py.

Run with the Python of the peer's own virtual environment (never the hub's), with
HELPDESK_PEER_DIR naming the directory that holds its SQLite file and media.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "peer_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
