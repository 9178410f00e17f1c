# Declarations of the compiled fan-out core; _fanout_py.py is the readable specification.
#
# Containers are ``readonly`` (Python may mutate them in place but never rebind them), so the
# hot loops may treat them as never None and use the list and dict macros without checks.

cimport cython


cdef class Message:
    cdef readonly bytes payload
    cdef readonly object key
    cdef readonly object message_type
    cdef readonly object message_id
    cdef readonly list encodings

    @cython.final
    cdef inline bytes _encoded(self, Py_ssize_t kind, object deflate)
    @cython.final
    cdef bytes _build(self, Py_ssize_t kind, object deflate)


cdef class Client:
    cdef readonly object client_id
    cdef public object write
    cdef readonly int kind
    cdef public bint writable
    cdef readonly set topics
    cdef readonly list frames
    cdef public Py_ssize_t buffered_bytes
    cdef public Py_ssize_t messages_sent
    cdef public Py_ssize_t messages_dropped
    cdef public Py_ssize_t conflated
    cdef readonly dict keys
    cdef readonly Py_ssize_t holes
    cdef public Py_ssize_t stamp
    cdef public bint pending
    cdef public bint blocked
    cdef public bint closed


cdef class Fanout:
    cdef public object loop
    cdef public Py_ssize_t client_buffer_size
    cdef public Py_ssize_t max_buffered_bytes
    cdef readonly int policy
    cdef public double flush_interval
    cdef public object on_overflow
    cdef public object on_blocked
    cdef public object deflate
    cdef readonly dict clients
    cdef readonly dict index
    cdef readonly list dirty
    cdef readonly list overflowed
    cdef readonly list newly_blocked
    cdef public object flush_handle
    cdef public Py_ssize_t publish_stamp
    cdef public Py_ssize_t deliveries
    cdef public Py_ssize_t drops
    cdef public Py_ssize_t conflations
    cdef public Py_ssize_t bytes_sent
    cdef public Py_ssize_t writes

    @cython.final
    cdef inline bint _enqueue(self, Client client, Message message) except -1
    @cython.final
    cdef inline bint _is_full(self, Client client, Py_ssize_t incoming)
    @cython.final
    cdef int _drop_oldest(self, Client client, Py_ssize_t incoming) except -1
    @cython.final
    cdef int _supersede(self, Client client, object key) except -1
    @cython.final
    cdef int _compact(self, Client client) except -1
    @cython.final
    cdef int _overflow(self, Client client) except -1
    @cython.final
    cdef int _after_publish(self, Py_ssize_t count) except -1
    @cython.final
    cdef int _report(self) except -1
    @cython.final
    cdef int _write(self, Client client) except -1
    @cython.final
    cdef int _discard(self, Client client) except -1
    @cython.final
    cdef inline int _empty(self, Client client) except -1
