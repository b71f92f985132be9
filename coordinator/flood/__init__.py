"""The servers under a flood: budgets for calls and connections per address, and rate limits.

callbudget.py   Who may hold the gRPC server's calls
callgate.py     Every gRPC call through `callbudget` before it is served
connections.py  How many HTTP connections one client address, and everyone together
ratelimit.py    Rate limits as token buckets: a pure decision
"""
