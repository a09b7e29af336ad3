-- Counts an attempt at a message that has started.
--
-- KEYS[1]: the message's counter of unfinished attempts. ARGV[1]: how long the count is
-- kept, s (from this attempt on).
-- Answers the count, this attempt included.

local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
