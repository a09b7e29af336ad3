-- Claims the pending confirmations that are due, so that one confirmer asks about each
-- (docs/contract.md section 6.1). A claim is a lease: the member's due time moves to
-- now + lease, so that if the confirmer dies before it settles, the member falls due again
-- and another confirmer takes it.
--
-- KEYS[1]: the pending confirmations, by due time (ms).
-- ARGV[1]: now ms. ARGV[2]: lease ms. ARGV[3]: the most members to claim.
--
-- Answers a flat array: member, token, member, token, ... The token is the member's new
-- score as Redis writes it; settling checks it, so that a confirmer whose claim ran out and
-- was taken over cannot settle what is no longer its own.

local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, member)
  out[#out + 1] = member
  out[#out + 1] = redis.call('ZSCORE', KEYS[1], member)
end
return out
