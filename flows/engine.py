"""The USSD conversation engine: screens, navigation, pagination, resume, languages.

A conversation is a stack of :class:`Frame` s (a screen name plus its arguments). Each hop the
engine takes the customer's newest input, lets the top screen answer it with a :data:`Step`,
and renders the new top screen. The engine, not the screens, owns what every screen shares:

- ``0`` goes back (to the previous page of a long list first), ``00`` goes home, on every screen;
- options are numbered and laid out in pages that fit ``max_chars`` (182 by default, ``CON ``
  included); an option is never split, and ``98 More`` appears only when there is more;
- a wrong answer re-prompts the same screen with a short reason above it;
- a redial within ``resume_window_s`` of an unfinished session offers "Continue where you left
  off? 1 Yes 2 No";
- text comes from ``flows/messages`` in the phone's language.

Aggregators differ in how they send input (Africa's Talking: the whole path ``1*2*37012345678``
every hop; Hubtel and others: the last answer only). :class:`UssdHop` carries either, and the
engine turns both into one new answer per hop. A hop repeated verbatim (an aggregator retry)
gets the same reply again without running anything twice.

Slow work never runs inside a hop: an END screen may carry a ``follow_up`` that the web layer
runs after the reply is out (see ``flows.ports.FollowUp``).
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Protocol

import structlog

from flows.messages import text as message
from flows.ports import CustomerServices, FollowUp, Language, SessionStore
from gateway.values.money import Money, currency_exponent
from gateway.values.phone import Msisdn

log = structlog.get_logger()

MAX_CHARS: Final = 182  # one USSD screen in GSM-7 (GSM 03.90), prefix included
BACK: Final = "0"
HOME: Final = "00"
MORE: Final = "98"
HOME_SCREEN: Final = "home"
RESUME_SCREEN: Final = "resume"


# --- what screens return -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notice:
    """A message shown once above the next screen (a reason for a re-prompt, a confirmation)."""

    key: str
    values: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Option:
    """One numbered choice: ``label`` is shown, ``value`` is what the screen's handler receives."""

    label: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class View:
    """What a screen shows: a body, then options (numbered by the engine) or a free-text prompt.

    ``context`` (shown before the body) and ``detail`` (after it) are dropped when the screen
    would not fit otherwise, e.g. under a re-prompt's notice. ``end`` closes the session
    (``END``); ``follow_up`` runs after that reply has been sent.
    """

    body: str
    context: str = ""
    detail: str = ""
    options: tuple[Option, ...] = ()
    end: bool = False
    follow_up: FollowUp | None = None


@dataclass(frozen=True, slots=True)
class Push:
    """Open ``screen`` on top of the current one (``0`` comes back here)."""

    screen: str
    args: Mapping[str, str] = field(default_factory=dict)
    notice: Notice | None = None


@dataclass(frozen=True, slots=True)
class Stay:
    """Show the same screen again with ``notice`` above it (a re-prompt)."""

    notice: Notice


@dataclass(frozen=True, slots=True)
class Back:
    """Close ``frames`` screens and show the one below, with an optional notice."""

    frames: int = 1
    notice: Notice | None = None


@dataclass(frozen=True, slots=True)
class Home:
    """Go to the home screen, with an optional notice."""

    notice: Notice | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """End the session with ``text`` (already in the customer's language)."""

    text: str
    follow_up: FollowUp | None = None


@dataclass(frozen=True, slots=True)
class _Resume:
    """Replace this session's stack with the unfinished one's (internal to resume)."""

    session_id: str


Step = Push | Stay | Back | Home | Finish | _Resume


@dataclass(slots=True)
class Context:
    """What a screen may use while it renders or answers."""

    services: CustomerServices
    phone: Msisdn
    session_id: str
    service_code: str
    language: Language
    hop: int

    def t(self, key: str, /, **values: object) -> str:
        """Message ``key`` in the session's language."""
        return message(self.language, key, **values)


class Screen(Protocol):
    """One screen of a journey. Screens keep no state: everything lives in ``args``."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:
        """What to show now."""
        ...

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:
        """React to a chosen option's ``value``, or to free text when the view has no options.

        ``0``, ``00`` and ``98`` never reach a screen: the engine handles them.
        """
        ...


# --- session state -------------------------------------------------------------------------------


@dataclass(slots=True)
class Frame:
    """One screen on the stack, with its arguments and its last rendering's choices."""

    screen: str
    args: dict[str, str] = field(default_factory=dict)
    page: int = 0
    notice: Notice | None = None
    choices: dict[str, str] = field(default_factory=dict)  # shown number → option value
    has_more: bool = False
    free_text: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out: dict[str, Any] = {"s": self.screen, "a": self.args, "p": self.page}
        if self.notice is not None:
            out["n"] = [self.notice.key, dict(self.notice.values)]
        if self.choices:
            out["c"] = self.choices
        if self.has_more:
            out["m"] = 1
        if self.free_text:
            out["f"] = 1
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Frame:
        """The frame :meth:`to_json` wrote."""
        notice = data.get("n")
        return cls(
            screen=data["s"],
            args=dict(data.get("a", {})),
            page=int(data.get("p", 0)),
            notice=Notice(notice[0], notice[1]) if notice else None,
            choices=dict(data.get("c", {})),
            has_more=bool(data.get("m")),
            free_text=bool(data.get("f")),
        )


@dataclass(slots=True)
class Session:
    """A USSD conversation between hops."""

    session_id: str
    phone: str
    language: Language
    stack: list[Frame]
    last_text: str | None = None  # cumulative text of the last hop (AT dialect)
    last_reply: str = ""
    ended: bool = False
    hops: int = 0
    updated_at: float = 0.0

    def dumps(self) -> str:
        """The session as compact JSON (an array, format 2), for a ``SessionStore``.

        Frames are positional ``[screen, args, page, notice, choices, flags]`` arrays: about a
        third cheaper to write and read than keyed objects, on every hop.
        """
        frames = [
            [
                frame.screen,
                frame.args,
                frame.page,
                None if frame.notice is None else [frame.notice.key, dict(frame.notice.values)],
                frame.choices,
                (_HAS_MORE if frame.has_more else 0) | (_FREE_TEXT if frame.free_text else 0),
            ]
            for frame in self.stack
        ]
        return _encode(
            [
                _FORMAT,
                self.session_id,
                self.phone,
                self.language.value,
                self.last_text,
                self.last_reply,
                self.ended,
                self.hops,
                self.updated_at,
                frames,
            ]
        )

    @classmethod
    def loads(cls, raw: str) -> Session:
        """The session :meth:`dumps` wrote (or the keyed-object form of earlier releases).

        Raises:
            ValueError: ``raw`` is not a session in either form.
        """
        data = _decode(raw)
        if isinstance(data, dict):
            return cls._loads_keyed(data)
        try:
            version, session_id, phone, language, text, reply, ended, hops, at, frames = data
            if version != _FORMAT:
                raise ValueError(f"session format {version!r}")
            stack = [
                Frame(
                    screen,
                    args,
                    page,
                    None if notice is None else Notice(notice[0], notice[1]),
                    choices,
                    bool(flags & _HAS_MORE),
                    bool(flags & _FREE_TEXT),
                )
                for screen, args, page, notice, choices, flags in frames
            ]
            return cls(
                session_id=session_id,
                phone=phone,
                language=_LANGUAGES[language],
                stack=stack,
                last_text=text,
                last_reply=reply,
                ended=ended,
                hops=hops,
                updated_at=at,
            )
        except (TypeError, KeyError, IndexError) as exc:
            raise ValueError("not a stored session") from exc

    @classmethod
    def _loads_keyed(cls, data: dict[str, Any]) -> Session:
        """A session in the keyed-object form written before format 2."""
        try:
            return cls(
                session_id=data["id"],
                phone=data["ph"],
                language=Language(data["l"]),
                stack=[Frame.from_json(f) for f in data["st"]],
                last_text=data.get("t"),
                last_reply=data.get("r", ""),
                ended=bool(data.get("e")),
                hops=int(data.get("h", 0)),
                updated_at=float(data.get("u", 0.0)),
            )
        except (TypeError, KeyError, IndexError) as exc:
            raise ValueError("not a stored session") from exc


_FORMAT: Final = 2
_HAS_MORE: Final = 1
_FREE_TEXT: Final = 2
_LANGUAGES: Final = {language.value: language for language in Language}
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_decode = json.JSONDecoder().decode


# --- the engine's inputs and outputs -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UssdHop:
    """One request from the aggregator, normalised by a dialect adapter.

    ``text`` is the whole input path joined by ``*`` when ``cumulative`` (Africa's Talking), or
    only the newest answer otherwise (Hubtel, Nalo, Arkesel). An empty ``text`` on a new
    session is a plain dial; a non-empty one pre-fills answers (``*384*123*1#``).
    """

    session_id: str
    phone: Msisdn
    service_code: str
    text: str
    cumulative: bool = True
    network_code: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class UssdReply:
    """What to answer to one hop.

    ``text`` comes without ``CON``/``END``; ``ends`` says whether the session closes;
    ``follow_up`` runs after the reply has been sent.
    """

    text: str
    ends: bool
    follow_up: FollowUp | None = None

    def render_at(self) -> str:
        """The reply in Africa's Talking's (and most aggregators') plain-text form."""
        return ("END " if self.ends else "CON ") + self.text


# --- the engine ----------------------------------------------------------------------------------


class UssdEngine:
    """Runs USSD conversations over a set of screens, keeping state in a ``SessionStore``.

    Args:
        services: the gateway as the flows see it.
        store: where sessions live between hops.
        screens: screen name → screen; must contain ``"home"``.
        default_language: for phones that never chose one.
        max_chars: a reply's limit, ``CON ``/``END `` included.
        resume_window_s: how long after its last hop an unfinished session may be resumed.
        session_ttl_s: how long a session's state is kept after its last hop.
        clock: seconds (wall clock); tests pass a fake.
    """

    def __init__(
        self,
        services: CustomerServices,
        store: SessionStore,
        screens: Mapping[str, Screen],
        *,
        default_language: Language = Language.EN,
        max_chars: int = MAX_CHARS,
        resume_window_s: float = 120.0,
        session_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if HOME_SCREEN not in screens:
            raise ValueError("screens must include 'home'")
        self._services = services
        self._store = store
        self._screens: dict[str, Screen] = {**screens, RESUME_SCREEN: _ResumeScreen()}
        self._default_language = default_language
        self.max_chars = max_chars
        self._resume_window_s = resume_window_s
        self._ttl_s = max(session_ttl_s, resume_window_s)
        self._clock = clock

    @property
    def services(self) -> CustomerServices:
        """The services the screens use."""
        return self._services

    async def handle(self, hop: UssdHop) -> UssdReply:
        """Answer one hop: apply the newest input(s), render the screen, save the session.

        Safe to call again with the same hop: the saved reply is returned unchanged.
        """
        key = _session_key(hop.session_id)
        raw = await self._store.get(key)
        session = Session.loads(raw) if raw is not None else None
        if session is None:
            session, inputs = await self._open(hop)
        elif session.phone != hop.phone:
            # A session id reused by another phone: never show one customer another's state.
            log.warning("ussd_session_phone_mismatch", session_id=hop.session_id)
            return UssdReply(text=message(session.language, "error_bad_request"), ends=True)
        else:
            if session.ended or (hop.cumulative and hop.text == session.last_text):
                return UssdReply(text=session.last_reply, ends=session.ended)
            inputs = [_newest_input(hop, session.last_text)]
            if any(frame.screen not in self._screens for frame in session.stack):
                # Saved by a release with other screens: start over rather than fail.
                session.stack[:] = [Frame(HOME_SCREEN)]
        session.hops += 1
        ctx = Context(
            services=self._services,
            phone=hop.phone,
            session_id=hop.session_id,
            service_code=hop.service_code,
            language=session.language,
            hop=session.hops,
        )
        follow_up: FollowUp | None = None
        finished: Finish | None = None
        for answer in inputs:
            finished = await self._apply(session, ctx, answer.strip())
            if finished is not None:
                break
        if finished is not None:
            body, ends, follow_up = _ascii(finished.text), True, finished.follow_up
        else:
            body, ends, follow_up = await self._render(session, ctx)
        if ends:
            session.ended = True
            body = _fit_prose(body, self.max_chars - 4)
        session.last_text = hop.text if hop.cumulative else None
        session.last_reply = body
        session.updated_at = self._clock()
        await self._store.put(key, session.dumps(), self._ttl_s)
        return UssdReply(text=body, ends=ends, follow_up=follow_up)

    async def session_ended(self, session_id: str, *, completed: bool) -> None:
        """The aggregator says the session is over (AT's end-of-session notification).

        A session that did not reach an END screen (timed out, dropped) stays resumable for
        ``resume_window_s``; a completed one is marked ended.
        """
        key = _session_key(session_id)
        raw = await self._store.get(key)
        if raw is None:
            return
        session = Session.loads(raw)
        if completed and not session.ended:
            session.ended = True
            await self._store.put(key, session.dumps(), self._ttl_s)

    def error_reply(self, language: Language | None, key: str = "error_generic") -> UssdReply:
        """An END reply for when the conversation itself failed (timeout, crash, bad request)."""
        return UssdReply(text=message(language or self._default_language, key), ends=True)

    # --- internals -------------------------------------------------------------------------------

    async def _open(self, hop: UssdHop) -> tuple[Session, list[str]]:
        language = await self._services.language(hop.phone) or self._default_language
        session = Session(
            session_id=hop.session_id,
            phone=hop.phone,
            language=language,
            stack=[Frame(HOME_SCREEN)],
        )
        inputs = [part for part in hop.text.split("*") if part] if hop.text else []
        last_key = _last_key(hop.phone)
        previous_id = await self._store.get(last_key)
        await self._store.put(last_key, hop.session_id, self._ttl_s)
        if not inputs and previous_id is not None and previous_id != hop.session_id:
            previous_raw = await self._store.get(_session_key(previous_id))
            if previous_raw is not None:
                previous = Session.loads(previous_raw)
                recent = self._clock() - previous.updated_at <= self._resume_window_s
                if recent and not previous.ended and len(previous.stack) > 1:
                    top = previous.stack[-1]
                    # Dropped on the resume prompt itself: offer what that prompt offered.
                    origin = top.args.get("from", previous_id)
                    origin = origin if top.screen == RESUME_SCREEN else previous_id
                    session.stack.append(Frame(RESUME_SCREEN, {"from": origin}))
        return session, inputs

    async def _apply(self, session: Session, ctx: Context, answer: str) -> Finish | None:
        frame = session.stack[-1]
        if not frame.choices and not frame.free_text:
            # Never shown yet (answers pre-filled in the dial string): lay it out to learn
            # its choices.
            await self._render(session, ctx)
        frame.notice = None
        if answer == HOME:
            session.stack[:] = [Frame(HOME_SCREEN)]
            return None
        if answer == BACK:
            if frame.page > 0:
                frame.page -= 1
            elif len(session.stack) > 1:
                session.stack.pop()
                session.stack[-1].notice = None
            return None
        if answer == MORE and frame.has_more:
            frame.page += 1
            return None
        screen = self._screens[frame.screen]
        if frame.free_text:
            step = await screen.answer(ctx, frame.args, answer)
        elif answer in frame.choices:
            step = await screen.answer(ctx, frame.args, frame.choices[answer])
        else:
            step = Stay(Notice("invalid_choice"))
        if isinstance(step, _Resume):
            await self._resume(session, step.session_id)
            return None
        return self._move(session, ctx, step)

    async def _resume(self, session: Session, previous_id: str) -> None:
        key = _session_key(previous_id)
        raw = await self._store.get(key)
        if raw is None:
            session.stack[:] = [Frame(HOME_SCREEN)]
            return
        previous = Session.loads(raw)
        session.stack[:] = previous.stack
        session.stack[-1].page = 0
        previous.ended = True  # resumed once; never offered again
        await self._store.put(key, previous.dumps(), self._ttl_s)

    def _move(self, session: Session, ctx: Context, step: Step) -> Finish | None:
        stack = session.stack
        match step:
            case Push(screen, args, notice):
                if screen not in self._screens:
                    raise KeyError(f"no screen named {screen!r}")
                stack.append(Frame(screen, dict(args), notice=notice))
            case Stay(notice):
                stack[-1].notice = notice
            case Back(frames, notice):
                del stack[max(1, len(stack) - frames) :]
                stack[-1].notice = notice
                stack[-1].page = 0
            case Home(notice):
                stack[:] = [Frame(HOME_SCREEN, notice=notice)]
            case Finish():
                return step
        session.language = ctx.language  # a screen may have changed it
        return None

    async def _render(self, session: Session, ctx: Context) -> tuple[str, bool, FollowUp | None]:
        frame = session.stack[-1]
        ctx.language = session.language
        view = await self._screens[frame.screen].view(ctx, frame.args)
        if view.end:
            return _ascii(view.body), True, view.follow_up
        notice = "" if frame.notice is None else ctx.t(frame.notice.key, **frame.notice.values)
        footer = "" if len(session.stack) == 1 else ctx.t("nav_footer")
        more = f"{MORE} {ctx.t('nav_more')}"
        labels = [_ascii(option.label) for option in view.options]
        budget = self.max_chars - 4
        # Say as much as fits: drop the context, then the detail, before paginating further.
        for parts in (
            (notice, view.context, view.body, view.detail),
            (notice, view.body, view.detail),
            (notice, view.body),
        ):
            head = "\n".join(_ascii(part) for part in parts if part)
            pages = _paginate(head, labels, footer=footer, more=more, budget=budget)
            if _page_length(head, labels, pages[0], footer, more, len(pages) > 1) <= budget:
                break
        frame.page = min(frame.page, len(pages) - 1)
        page = pages[frame.page]
        frame.free_text = not view.options
        frame.has_more = frame.page < len(pages) - 1
        frame.choices = {str(i + 1): view.options[i].value for i in page}
        lines = [head] if head else []
        lines += [f"{i + 1} {_ascii(view.options[i].label)}" for i in page]
        if frame.has_more:
            lines.append(more)
        if footer:
            lines.append(footer)
        body = "\n".join(lines)
        if len(body) > self.max_chars - 4:  # only when the head alone is too long
            body = _fit_prose(body, self.max_chars - 4)
        return body, False, None


class _ResumeScreen:
    """'Continue where you left off? 1 Yes 2 No', offered on a redial after a lost session."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        return View(
            body=ctx.t("resume_title"),
            options=(Option(ctx.t("yes"), "yes"), Option(ctx.t("no"), "no")),
        )

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        if answer != "yes":
            return Home()
        return _Resume(args.get("from", ""))


def _session_key(session_id: str) -> str:
    return f"ussd:s:{session_id}"


def _last_key(phone: str) -> str:
    return f"ussd:last:{phone}"


def _newest_input(hop: UssdHop, last_text: str | None) -> str:
    """The answer this hop adds: the text after the previous path (AT), or the text itself."""
    if not hop.cumulative:
        return hop.text
    previous = last_text or ""
    if not previous:  # after a plain dial: an empty first answer leaves a leading "*"
        return hop.text.removeprefix("*")
    if hop.text.startswith(previous + "*"):
        return hop.text[len(previous) + 1 :]
    return hop.text.rsplit("*", 1)[-1]


def _page_length(
    head: str, labels: list[str], page: list[int], footer: str, more: str, has_more: bool
) -> int:
    lines = [head] if head else []
    lines += [f"{i + 1} {labels[i]}" for i in page]
    lines += [more] if has_more else []
    lines += [footer] if footer else []
    return len("\n".join(lines))


def _paginate(
    head: str, labels: list[str], *, footer: str, more: str, budget: int
) -> list[list[int]]:
    """Split option indexes into pages whose rendering fits ``budget`` characters.

    Each page repeats ``head`` and ``footer``; every page but the last ends with ``more``.
    An option is never split; one too long for any page gets a page of its own (and is cut by
    the final length guard).
    """
    if not labels:
        return [[]]
    fixed = (len(head) + 1 if head else 0) + (len(footer) + 1 if footer else 0)
    pages: list[list[int]] = []
    current: list[int] = []
    used = fixed
    for index, label in enumerate(labels):
        line = len(f"{index + 1} {label}") + 1
        is_last = index == len(labels) - 1
        reserve = 0 if is_last else len(more) + 1
        if current and used + line + reserve > budget + 1:
            pages.append(current)
            current, used = [], fixed
        current.append(index)
        used += line
    pages.append(current)
    return pages


def _ascii(text: str) -> str:
    """``text`` folded to plain ASCII: telcos cannot render anything else on USSD."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _fit_prose(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at a word boundary, with ``..`` when cut."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 2].rsplit(" ", 1)[0]
    return cut + ".."


@lru_cache(maxsize=4096)
def format_money(amount: Money) -> str:
    """``KES 1,500`` for whole amounts, ``KES 1,500.50`` otherwise: short for small screens.

    Remembered: the same few amounts (limits, the common purchases) come back on every screen,
    and the ``Decimal`` arithmetic costs microseconds each time.
    """
    exponent = currency_exponent(amount.currency)
    major = amount.major
    if major == major.to_integral_value():
        return f"{amount.currency} {int(major):,}"
    return f"{amount.currency} {major:,.{exponent}f}"


def format_units(units_tenth_kwh: int) -> str:
    """Tenths of a kWh as ``25.3``."""
    whole, tenth = divmod(units_tenth_kwh, 10)
    return f"{whole}.{tenth}"
