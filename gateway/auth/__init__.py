"""Who is calling and what they may do: API keys with scopes, the path policy, per-key limits.

No web framework here: the middleware asks `policy` which scope a path needs and `KeyRing` who a
bearer token belongs to; services read the identity from the RequestContext.
"""
