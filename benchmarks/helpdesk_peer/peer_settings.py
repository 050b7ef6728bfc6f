"""Settings of the django-helpdesk peer: SQLite, no web server, no outgoing mail.

Everything the peer writes (db.sqlite3, attachments under media/) lives in
HELPDESK_PEER_DIR, a temporary directory made by benchmarks/email_import.py.
"""

import os
from pathlib import Path

DATA = Path(os.environ["HELPDESK_PEER_DIR"])

SECRET_KEY = "benchmark-only-not-secret"
DEBUG = False  # DEBUG=True would keep every SQL query in memory
ALLOWED_HOSTS = ["127.0.0.1"]
USE_TZ = True
TIME_ZONE = "UTC"
SITE_ID = 1

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.sites",
    "django.contrib.humanize",
    "rest_framework",
    "helpdesk",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "peer_urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA / "db.sqlite3",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

MEDIA_ROOT = DATA / "media"
MEDIA_URL = "/media/"
STATIC_URL = "/static/"

# The hub sends nothing when it ingests mail: neither does the peer. (peer.py setup
# also removes helpdesk's notification templates, so nothing is even rendered.)
EMAIL_BACKEND = "django.core.mail.backends.dummy.EmailBackend"
DEFAULT_FROM_EMAIL = "support@example.test"

# Teams mode needs the pinax-teams app; the IMAP import does not use it.
HELPDESK_TEAMS_MODE_ENABLED = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    # One 'template "newticket_submitter" does not exist' line per mail otherwise.
    "loggers": {"helpdesk": {"level": "ERROR"}},
}
