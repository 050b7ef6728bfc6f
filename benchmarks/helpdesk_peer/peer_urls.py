"""URLs of the peer project: helpdesk's own (required by its templates and checks)."""

from django.urls import include, path

urlpatterns = [path("helpdesk/", include("helpdesk.urls"))]
