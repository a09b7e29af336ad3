-- Starts or lengthens a team's cooldown after a 429, for every replica.
--
-- KEYS[1]: the team's cooldown. ARGV[1]: how long it lasts, ms.
-- Answers 0. A cooldown that already lasts longer is left as it is.

if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
