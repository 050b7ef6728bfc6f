"""Which adapter class serves which channel type; imported lazily so that a channel's
dependencies load only when configured."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from hub.channels.base import ChannelAdapter

if TYPE_CHECKING:
    from hub.config import ChannelConfig, Config

_FACTORIES: dict[str, str] = {
    "webchat": "hub.channels.webchat:WebchatAdapter",
    "sms": "hub.channels.sms:SmsAdapter",
    "voice": "hub.channels.voice:VoiceAdapter",
    "email": "hub.channels.email:EmailAdapter",
}


class UnsupportedChannel(Exception):
    pass


def build_adapter(channel: ChannelConfig, config: Config) -> ChannelAdapter:
    module_name, _, class_name = _FACTORIES[channel.type].partition(":")
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise UnsupportedChannel(
            f"channel {channel.name!r}: type {channel.type!r} is not available in this build"
        ) from None
    cls = getattr(module, class_name)
    adapter: ChannelAdapter = cls(channel, config)
    return adapter
