"""The compiled fan-out core.

``_fanout_py.py`` is the readable specification: this module mirrors its public names,
signatures, counters and behaviour, and produces the same bytes. State and the private helpers
(``_enqueue``, ``_write``, ...) are declared in ``_fanout.pxd``; the helpers are C-level only.
"""

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.dict cimport PyDict_GetItemWithError, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.string cimport memcpy

cimport cython

import orjson

from .wire import JSON_OPTIONS


cdef extern from "Python.h":
    # Borrowed-pointer forms of the bytes macros, for items read with PyList_GET_ITEM.
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject* o)
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* o)
    # PyList_SetSlice with a NULL item list deletes list[low:high].
    int _list_del_slice "PyList_SetSlice"(
        object lst, Py_ssize_t low, Py_ssize_t high, PyObject* itemlist
    ) except -1


__all__ = [
    "CONFLATE",
    "DEFLATE_FRAMES",
    "DISCONNECT",
    "DROP_OLDEST",
    "FRAME_KINDS",
    "POLICIES",
    "SSE_EVENTS",
    "TEXT_MESSAGES",
    "WEBSOCKET_FRAMES",
    "Client",
    "Fanout",
    "Message",
    "build_event",
    "build_frame",
    "encode_envelope",
]

cdef object _JSON_OPTIONS = JSON_OPTIONS
cdef object _dumps = orjson.dumps

cdef enum:
    _TEXT_FIN = 0x81  # FIN bit set, opcode 1 (text)
    _RSV1 = 0x40  # "per-message compressed" (RFC 7692 6)
    _WEBSOCKET_FRAMES = 0
    _TEXT_MESSAGES = 1
    _DEFLATE_FRAMES = 2
    _SSE_EVENTS = 3
    _KIND_COUNT = 4
    _DISCONNECT = 0
    _DROP_OLDEST = 1
    _CONFLATE = 2

# The frame kinds, as in the twin, which documents them; the next kind plugs in here, in
# Message._build and, if its queue is not joined, in Fanout._write.
WEBSOCKET_FRAMES = _WEBSOCKET_FRAMES
TEXT_MESSAGES = _TEXT_MESSAGES
DEFLATE_FRAMES = _DEFLATE_FRAMES
SSE_EVENTS = _SSE_EVENTS
FRAME_KINDS = (WEBSOCKET_FRAMES, TEXT_MESSAGES, DEFLATE_FRAMES, SSE_EVENTS)

# The slow-client policies, as in the twin, which documents them.
DISCONNECT = _DISCONNECT
DROP_OLDEST = _DROP_OLDEST
CONFLATE = _CONFLATE
POLICIES = (DISCONNECT, DROP_OLDEST, CONFLATE)

# A superseded frame's slot: it joins to nothing, and text queues leave it out.
cdef bytes _HOLE = b""


def encode_envelope(
    message_type,
    data,
    timestamp,
    message_id=None,
    client_id=None,
    error=None,
    key=None,
):
    """Serialize one wire envelope to JSON bytes.

    Keys appear in a fixed order (type, data, timestamp, id, key, client_id, error) and are
    absent when their value is ``None``. Raises TypeError when orjson cannot serialize ``data``.
    """
    cdef dict envelope = {"type": message_type}
    if data is not None:
        envelope["data"] = data
    envelope["timestamp"] = timestamp
    if message_id is not None:
        envelope["id"] = message_id
    if key is not None:
        envelope["key"] = key
    if client_id is not None:
        envelope["client_id"] = client_id
    if error is not None:
        envelope["error"] = error
    return _dumps(envelope, option=_JSON_OPTIONS)


def build_frame(payload, bint compressed=False):
    """Wrap ``payload`` in one unmasked, unfragmented WebSocket text frame (RFC 6455 5.2);
    with ``compressed``, RSV1 is set (see the twin)."""
    cdef unsigned char header[10]
    cdef Py_ssize_t header_size
    cdef Py_ssize_t length
    cdef unsigned long long wide
    cdef int shift
    cdef bytes frame
    cdef char* out

    if PyBytes_Check(payload):
        length = PyBytes_GET_SIZE(payload)
    else:
        length = len(payload)  # other buffers: same result as the spec's header + payload
    header[0] = _TEXT_FIN | _RSV1 if compressed else _TEXT_FIN
    if length < 126:
        header[1] = <unsigned char>length
        header_size = 2
    elif length < 65536:
        header[1] = 126
        header[2] = <unsigned char>((length >> 8) & 0xFF)
        header[3] = <unsigned char>(length & 0xFF)
        header_size = 4
    else:
        header[1] = 127
        wide = <unsigned long long>length
        for shift in range(8):
            header[2 + shift] = <unsigned char>((wide >> (56 - 8 * shift)) & 0xFF)
        header_size = 10
    if not PyBytes_Check(payload):
        return PyBytes_FromStringAndSize(<char*>header, header_size) + payload
    frame = PyBytes_FromStringAndSize(NULL, header_size + length)
    out = PyBytes_AS_STRING(frame)
    memcpy(out, header, header_size)
    memcpy(out + header_size, PyBytes_AS_STRING(payload), length)
    return frame


def build_event(payload, message_type=None, message_id=None):
    """One Server-Sent Events record of ``payload`` (see the twin)."""
    cdef bytes head = b""
    if message_id is not None and not _breaks_line(message_id):
        head = b"id: " + (<str>message_id).encode() + b"\n"
    if message_type is not None and not _breaks_line(message_type):
        head += b"event: " + (<str>message_type).encode() + b"\n"
    if b"\n" in payload or b"\r" in payload:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join([b"data: " + line + b"\n" for line in lines]) + b"\n"
    return head + b"data: " + payload + b"\n\n"


cdef inline bint _breaks_line(object text):
    return "\n" in text or "\r" in text


cdef bytes _join_frames(list frames):
    """``b"".join(frames)`` into one preallocated object; every frame is bytes."""
    cdef Py_ssize_t count = PyList_GET_SIZE(frames)
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t size
    cdef Py_ssize_t i
    cdef PyObject* item
    cdef bytes data
    cdef char* out

    for i in range(count):
        total += _bytes_size(PyList_GET_ITEM(frames, i))
    data = PyBytes_FromStringAndSize(NULL, total)
    out = PyBytes_AS_STRING(data)
    for i in range(count):
        item = PyList_GET_ITEM(frames, i)
        size = _bytes_size(item)
        memcpy(out, _bytes_data(item), size)
        out += size
    return data


cdef class Message:
    """One serialized message and the wire encodings built of it so far (see the twin)."""

    def __cinit__(self, *args, **kwargs):
        self.encodings = [None, None, None, None]

    def __init__(self, payload, key=None, message_type=None, message_id=None):
        if not PyBytes_CheckExact(payload):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        for name, value in (("key", key), ("message_type", message_type), ("message_id", message_id)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        self.payload = payload
        self.key = key
        self.message_type = message_type
        self.message_id = message_id
        self.encodings = [None, payload, None, None]

    def encoded(self, Py_ssize_t kind, deflate=None):
        """The message in frame kind ``kind``, built on first use; DEFLATE_FRAMES compresses
        with ``deflate``. ValueError for an unknown kind, or a compressed frame not built yet
        without a ``deflate``."""
        if kind < 0 or kind >= PyList_GET_SIZE(self.encodings):
            raise ValueError(f"unknown frame kind {kind!r}")
        return self._encoded(kind, deflate)

    @cython.final
    cdef inline bytes _encoded(self, Py_ssize_t kind, object deflate):
        cdef PyObject* found = PyList_GET_ITEM(self.encodings, kind)
        cdef bytes built
        if found is not <PyObject*>None:
            return <bytes>found
        built = self._build(kind, deflate)
        self.encodings[kind] = built
        return built

    @cython.final
    cdef bytes _build(self, Py_ssize_t kind, object deflate):
        # TEXT_MESSAGES is the payload itself, built with the message.
        if kind == _WEBSOCKET_FRAMES:
            return build_frame(self.payload)
        if kind == _SSE_EVENTS:
            return build_event(self.payload, self.message_type, self.message_id)
        if deflate is None:
            raise ValueError("a compressed frame needs the fan-out's deflate")
        body = deflate(self.payload)
        if body is None:
            return self._encoded(_WEBSOCKET_FRAMES, None)
        if not PyBytes_CheckExact(body):
            raise TypeError(f"deflate must return bytes or None, got {type(body).__name__}")
        return build_frame(body, True)


cdef class Client:
    """One client's place in the fan-out: its subscriptions and its bounded frame buffer.

    ``Client(client_id, write, kind=WEBSOCKET_FRAMES)``, as in the twin. Hashable by identity.
    """

    def __cinit__(self, *args, **kwargs):
        # The hot paths treat these as never None, even before __init__ has run.
        self.topics = set()
        self.frames = []

    def __init__(self, client_id, write, int kind=_WEBSOCKET_FRAMES):
        if kind < 0 or kind >= _KIND_COUNT:
            raise ValueError(f"unknown frame kind {kind!r}")
        self.client_id = client_id
        self.write = write
        self.kind = kind
        self.writable = True
        self.topics = set()
        self.frames = []
        self.buffered_bytes = 0
        self.messages_sent = 0
        self.messages_dropped = 0
        self.conflated = 0  # messages superseded by a newer one with their key
        # Under CONFLATE, while not writable: the index in ``frames`` of each keyed frame
        # queued meanwhile (None until there is one, as in the twin), and how many slots of
        # ``frames`` are holes.
        self.keys = None
        self.holes = 0
        # Number of the last publish queued for this client: de-duplicates a message whose
        # topics match several of the client's subscriptions, in O(1) per match.
        self.stamp = 0
        self.pending = False  # in Fanout.dirty, waiting for the next flush
        self.blocked = False  # not writable: on_blocked was told, unblock() resumes
        self.closed = False  # overflowed, closing or removed: accepts no more frames


cdef class Fanout:
    """Topic index, per-client bounded buffers and the coalescing flush.

    Keyword-only arguments as in ``_fanout_py.Fanout``: ``client_buffer_size``,
    ``max_buffered_bytes``, ``policy``, ``flush_interval``, ``on_overflow``, ``on_blocked``,
    ``deflate``.
    The callback contract is the twin's (see its module docstring).
    """

    def __cinit__(self, *args, **kwargs):
        # The hot paths treat these as never None, even before __init__ has run.
        self.clients = {}
        self.index = {}
        self.dirty = []
        self.overflowed = []
        self.newly_blocked = []

    def __init__(
        self,
        loop,
        *,
        Py_ssize_t client_buffer_size,
        Py_ssize_t max_buffered_bytes,
        int policy,
        double flush_interval,
        on_overflow,
        on_blocked,
        deflate=None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown slow-client policy {policy!r}")
        self.loop = loop
        self.client_buffer_size = client_buffer_size
        self.max_buffered_bytes = max_buffered_bytes
        self.policy = policy
        self.flush_interval = flush_interval
        self.on_overflow = on_overflow
        self.on_blocked = on_blocked
        self.deflate = deflate
        self.clients = {}
        self.index = {}
        self.dirty = []
        self.overflowed = []
        self.newly_blocked = []
        self.flush_handle = None
        self.publish_stamp = 0
        self.deliveries = 0
        self.drops = 0
        self.conflations = 0
        self.bytes_sent = 0
        self.writes = 0

    # Membership and subscriptions

    def add_client(self, Client client not None):
        """Start delivering to ``client``."""
        self.clients[client.client_id] = client

    def remove_client(self, Client client not None):
        """Stop delivering to ``client`` and forget its subscriptions and buffered frames."""
        self.unsubscribe(client, list(client.topics))
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
        client.closed = True
        self._empty(client)

    def close_client(self, Client client not None):
        """The client's transport is closing: drop what is queued (counted), accept no more."""
        self._discard(client)
        client.closed = True

    def subscribe(self, Client client not None, topics):
        """Add ``topics`` to the client's subscriptions; topics it already has are kept once."""
        cdef dict subscribers
        for topic in topics:
            if topic not in client.topics:
                client.topics.add(topic)
                subscribers = self.index.get(topic)
                if subscribers is None:
                    subscribers = {}
                    self.index[topic] = subscribers
                subscribers[client] = None

    def unsubscribe(self, Client client not None, topics):
        """Remove ``topics`` from the client's subscriptions; unknown topics are ignored."""
        cdef dict subscribers
        for topic in topics:
            if topic in client.topics:
                client.topics.discard(topic)
                subscribers = self.index[topic]
                del subscribers[client]
                if not subscribers:
                    del self.index[topic]

    # Publishing

    def publish_all(self, Message message not None):
        """Queue ``message`` for every client. Returns how many clients it was queued for."""
        cdef Py_ssize_t count = 0
        cdef Py_ssize_t pos = 0
        cdef PyObject* key
        cdef PyObject* value
        cdef dict clients = self.clients
        # The callback contract keeps the dict unchanged while this walks it.
        while PyDict_Next(clients, &pos, &key, &value):
            if self._enqueue(<Client>value, message):
                count += 1
        self._after_publish(count)
        return count

    def publish_topics(self, Message message not None, topics):
        """Queue ``message`` once for every client subscribed to one of ``topics`` or to ``"*"``.

        Returns how many clients it was queued for.
        """
        cdef Py_ssize_t count = 0
        cdef Py_ssize_t stamp
        cdef Py_ssize_t pos
        cdef PyObject* key
        cdef PyObject* value
        cdef PyObject* found
        cdef dict subscribers
        cdef Client client

        self.publish_stamp += 1
        stamp = self.publish_stamp
        found = PyDict_GetItemWithError(self.index, "*")
        if found is not NULL:
            subscribers = <dict>found
            pos = 0
            while PyDict_Next(subscribers, &pos, &key, &value):
                client = <Client>key
                client.stamp = stamp
                if self._enqueue(client, message):
                    count += 1
        for topic in topics:
            found = PyDict_GetItemWithError(self.index, topic)
            if found is NULL:
                continue
            subscribers = <dict>found
            pos = 0
            while PyDict_Next(subscribers, &pos, &key, &value):
                client = <Client>key
                if client.stamp != stamp:
                    client.stamp = stamp
                    if self._enqueue(client, message):
                        count += 1
        self._after_publish(count)
        return count

    def send(self, Client client not None, Message message not None):
        """Queue ``message`` for one client, behind what is already queued for it.

        Returns False when the client no longer accepts frames.
        """
        cdef bint queued = self._enqueue(client, message)
        self._after_publish(1 if queued else 0)
        return queued

    @cython.final
    cdef inline bint _enqueue(self, Client client, Message message) except -1:
        cdef PyObject* found
        cdef bytes frame
        cdef Py_ssize_t size
        cdef bint tracked = False
        if client.closed:
            return False
        # An encoding already built costs one list read; kinds are checked in Client().
        found = PyList_GET_ITEM(message.encodings, client.kind)
        if found is not <PyObject*>None:
            frame = <bytes>found
        else:
            frame = message._encoded(client.kind, self.deflate)
        size = PyBytes_GET_SIZE(frame)
        # Only a client that is not writable conflates, and only it indexes its keys; the
        # writable flag comes first, so a healthy client pays one flag read for all of it.
        if not client.writable and self.policy == _CONFLATE and message.key is not None:
            tracked = True
            self._supersede(client, message.key)
        if self._is_full(client, size):
            if client.writable:
                # A burst larger than the buffer, to a transport that can take it: write what
                # is queued now rather than treat a healthy client as slow.
                self._write(client)
            if self._is_full(client, size):
                if self.policy != _DROP_OLDEST:
                    self._overflow(client)
                    return False
                self._drop_oldest(client, size)
            elif client.closed:  # the write failed or the transport closed meanwhile
                return False
        if tracked:
            if client.keys is None:
                client.keys = {}
            PyDict_SetItem(client.keys, message.key, PyList_GET_SIZE(client.frames))
        PyList_Append(client.frames, frame)
        client.buffered_bytes += size
        self.deliveries += 1
        if not client.pending:
            client.pending = True
            PyList_Append(self.dirty, client)
        return True

    @cython.final
    cdef inline bint _is_full(self, Client client, Py_ssize_t incoming):
        """Whether ``incoming`` more bytes would pass the client's caps (an empty buffer
        always takes one frame, so a message larger than the byte cap still flows)."""
        cdef Py_ssize_t queued = PyList_GET_SIZE(client.frames) - client.holes
        return queued > 0 and (
            queued >= self.client_buffer_size
            or client.buffered_bytes + incoming > self.max_buffered_bytes
        )

    @cython.final
    cdef int _supersede(self, Client client, object key) except -1:
        """Take the queued frame with ``key``, if any, out of the client's queue (its slot
        becomes a hole)."""
        cdef object found
        cdef Py_ssize_t index
        cdef list frames = client.frames
        if client.keys is None:
            return 0
        found = client.keys.pop(key, None)
        if found is None:
            return 0
        index = found
        client.buffered_bytes -= _bytes_size(PyList_GET_ITEM(frames, index))
        frames[index] = _HOLE
        client.holes += 1
        client.conflated += 1
        self.conflations += 1
        if client.holes > self.client_buffer_size:
            self._compact(client)
        return 0

    @cython.final
    cdef int _compact(self, Client client) except -1:
        """Leave the holes out of the client's queue (see the twin)."""
        cdef dict key_at = {index: key for key, index in (client.keys or {}).items()}
        cdef list frames = []
        cdef dict keys = {}
        cdef Py_ssize_t index
        cdef object frame
        cdef object key
        for index in range(PyList_GET_SIZE(client.frames)):
            frame = <object>PyList_GET_ITEM(client.frames, index)
            if _bytes_size(<PyObject*>frame):
                key = key_at.get(index)
                if key is not None:
                    keys[key] = PyList_GET_SIZE(frames)
                PyList_Append(frames, frame)
        client.frames = frames
        client.keys = keys
        client.holes = 0
        return 0

    @cython.final
    cdef int _drop_oldest(self, Client client, Py_ssize_t incoming) except -1:
        # Frames are always bytes: they come from Message encodings.
        cdef list frames = client.frames
        cdef Py_ssize_t queued = PyList_GET_SIZE(frames)
        cdef Py_ssize_t buffered = client.buffered_bytes
        cdef Py_ssize_t dropped = 0
        while dropped < queued and (
            queued - dropped >= self.client_buffer_size
            or buffered + incoming > self.max_buffered_bytes
        ):
            buffered -= _bytes_size(PyList_GET_ITEM(frames, dropped))
            dropped += 1
        if dropped:
            _list_del_slice(frames, 0, dropped, NULL)
            client.buffered_bytes = buffered
            client.messages_dropped += dropped
            self.drops += dropped
        return 0

    @cython.final
    cdef int _overflow(self, Client client) except -1:
        cdef Py_ssize_t dropped = PyList_GET_SIZE(client.frames) - client.holes + 1
        client.messages_dropped += dropped
        self.drops += dropped
        client.closed = True
        self._empty(client)
        PyList_Append(self.overflowed, client)
        return 0

    @cython.final
    cdef int _after_publish(self, Py_ssize_t count) except -1:
        if count and self.flush_handle is None:
            if self.flush_interval > 0:
                self.flush_handle = self.loop.call_later(self.flush_interval, self.flush)
            else:
                self.flush_handle = self.loop.call_soon(self.flush)
        if PyList_GET_SIZE(self.overflowed) or PyList_GET_SIZE(self.newly_blocked):
            self._report()
        return 0

    @cython.final
    cdef int _report(self) except -1:
        """Tell the callbacks, after the walks over the topic index, which they may change."""
        cdef list clients
        if PyList_GET_SIZE(self.newly_blocked):
            clients = self.newly_blocked
            self.newly_blocked = []
            for client in clients:
                self.on_blocked(client)
        if PyList_GET_SIZE(self.overflowed):
            clients = self.overflowed
            self.overflowed = []
            for client in clients:
                self.on_overflow(client)
        return 0

    # Flushing

    def flush(self):
        """Write each client's queued frames with one call of its ``write``."""
        cdef list dirty
        cdef Client client
        cdef Py_ssize_t i = 0
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        dirty = self.dirty
        self.dirty = []
        # Re-reads the size each step, like list iteration: write runs Python code.
        while i < PyList_GET_SIZE(dirty):
            client = <Client>PyList_GET_ITEM(dirty, i)
            i += 1
            client.pending = False
            self._write(client)
        if PyList_GET_SIZE(self.newly_blocked):
            self._report()

    def unblock(self, Client client not None):
        """The client is writable again: write what it queued meanwhile."""
        client.blocked = False
        self._write(client)
        if PyList_GET_SIZE(self.newly_blocked):
            self._report()

    @cython.final
    cdef int _write(self, Client client) except -1:
        cdef list frames = client.frames
        cdef Py_ssize_t count = PyList_GET_SIZE(frames)
        cdef Py_ssize_t size
        cdef object data
        if client.closed or not count:
            return 0
        if not client.writable:
            if not client.blocked:
                client.blocked = True
                PyList_Append(self.newly_blocked, client)
            return 0
        if client.kind != _TEXT_MESSAGES:
            if count == 1:
                data = <bytes>PyList_GET_ITEM(frames, 0)
            else:
                data = _join_frames(frames)  # holes join to nothing
            size = PyBytes_GET_SIZE(data)
        elif client.holes:
            data = [frame for frame in frames if PyBytes_GET_SIZE(frame)]
            size = client.buffered_bytes
        else:
            data = frames
            size = client.buffered_bytes
        count -= client.holes
        # Emptied before the call, which may come back into the core (the callback contract).
        self._empty(client)
        try:
            client.write(data)
        except Exception:
            # A transport torn down under us; its owner reports the close.
            client.messages_dropped += count
            self.drops += count
            return 0
        client.messages_sent += count
        self.bytes_sent += size
        self.writes += 1
        return 0

    @cython.final
    cdef int _discard(self, Client client) except -1:
        cdef Py_ssize_t dropped = PyList_GET_SIZE(client.frames) - client.holes
        client.messages_dropped += dropped
        self.drops += dropped
        self._empty(client)
        return 0

    @cython.final
    cdef inline int _empty(self, Client client) except -1:
        client.frames = []
        client.buffered_bytes = 0
        if client.keys is not None:
            client.holes = 0
            client.keys = None
        return 0

    def close(self):
        """Cancel a scheduled flush; queued frames stay where they are."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
