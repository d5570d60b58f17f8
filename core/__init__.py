"""The layer both sides of cohort stand on; it imports neither ``scheduler`` nor ``workers``.

    errors       the exception tree every user sees
    messages     every message between client, coordinator and workers (msgspec structs)
    codec        how a message and its tensor buffers become frames
    unix_link    messages of frames over a Unix socket, between processes of one host
    tensors      tensor headers and bytes: encode, check, decode, slice and join rows
    spec         a group's definition as data (GroupConfig in, GroupSpec to workers)
    definition   building the module and its bank entries from a group, once
    bank         the stacked per-model tensors in IPC-shared memory, and their handles
    device       which torch device a setting names
"""
