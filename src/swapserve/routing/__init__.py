"""Routing policy: traffic split, shadow, cohort rules and sticky keys.

The hot-path router is native (:class:`swapserve.native.Router`); ``reference`` holds a
small pure-Python router with identical semantics, used to check the native one.
"""
