-- Frees a lease, only if this round of this job holds it.
--
-- KEYS[1]: the lease. ARGV[1]: the round's token.
-- Answers 1 when the lease was freed, 0 when it was not ours (or already gone).

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
