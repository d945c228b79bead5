"""The conversation layer: USSD menus and SMS commands, reaching the rest only through ports.

``flows.ports`` declares what the flows need (:class:`CustomerServices`, :class:`SessionStore`);
``gateway/app.py`` supplies them. Build the USSD side with ``UssdEngine(services, store,
build_screens())`` and the SMS side with ``SmsCommands(services)``.
"""

from flows.engine import UssdEngine, UssdHop, UssdReply
from flows.journeys import build_screens
from flows.ports import CustomerServices, FollowUp, Language, SessionStore
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.sms_commands import SmsCommands, SmsOutcome

__all__ = [
    "CustomerServices",
    "FollowUp",
    "Language",
    "MemorySessionStore",
    "SessionStore",
    "SmsCommands",
    "SmsOutcome",
    "SqliteSessionStore",
    "UssdEngine",
    "UssdHop",
    "UssdReply",
    "build_screens",
]
