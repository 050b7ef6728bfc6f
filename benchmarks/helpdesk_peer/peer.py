"""Set up and inspect the django-helpdesk peer (run with the peer venv's Python).

`python peer.py setup HOST PORT USER PASSWORD` creates the IMAP queue (after migrate);
`python peer.py count` prints JSON: tickets, follow-ups, distinct Message-IDs stored.
"""

import json
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "peer_settings")

import django

django.setup()

from helpdesk.models import (  # noqa: E402
    EmailTemplate,
    FollowUp,
    FollowUpAttachment,
    Queue,
    Ticket,
)


def setup(host: str, port: str, user: str, password: str) -> None:
    Queue.objects.all().delete()
    Queue.objects.create(
        title="Support",
        slug="support",
        email_address="support@example.test",
        allow_email_submission=True,
        email_box_type="imap",
        email_box_host=host,
        email_box_port=int(port),
        email_box_ssl=False,
        email_box_user=user,
        email_box_pass=password,
        email_box_imap_folder="INBOX",
        email_box_interval=0,  # process the mailbox whenever get_email runs
    )
    # No acknowledgement to each sender (the hub sends none on ingest either): without
    # templates helpdesk renders and sends nothing.
    EmailTemplate.objects.all().delete()
    print(json.dumps({"queues": Queue.objects.count()}))


def count() -> None:
    print(
        json.dumps(
            {
                "tickets": Ticket.objects.count(),
                "followups": FollowUp.objects.count(),
                "followups_with_message_id": FollowUp.objects.exclude(message_id=None)
                .exclude(message_id="")
                .count(),
                "distinct_message_ids": FollowUp.objects.exclude(message_id=None)
                .exclude(message_id="")
                .values("message_id")
                .distinct()
                .count(),
                "attachments": FollowUpAttachment.objects.count(),
            }
        )
    )


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"setup": setup, "count": count}[command](*args)
