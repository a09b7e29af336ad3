-- Settles one claimed confirmation (docs/contract.md section 6.1): asks again later, or ends
-- it with its stream entry. Only the claim's holder may settle it.
--
-- KEYS[1]: the pending confirmations, by due time. KEYS[2]: the member's pending hash.
-- KEYS[3]: the deliveries stream. KEYS[4]: the notification's sent marker. KEYS[5]: its
--   incident's sequence (any key when it has none).
-- ARGV[1]: the member. ARGV[2]: the claim's token. ARGV[3]: "again" or "done".
-- ARGV[4]: again: the next due time in ms; done: the stream's maxlen.
-- ARGV[5]: done: "1" when the request failed after its 202: the sent marker is deleted (so
--   that a replay of the dead letter is delivered again) and the incident's sequence is put
--   back to what it was before this delivery, if no later delivery moved it since.
-- ARGV[6]: done: the stream entry as a JSON array [[name, value], ...].
--
-- Answers "lost" when the claim is no longer the caller's (it ran out and another
-- confirmer took the member, or it was settled already), "again" after rescheduling, and
-- the stream entry's id once done.

local member, token, op = ARGV[1], ARGV[2], ARGV[3]
if redis.call('ZSCORE', KEYS[1], member) ~= token then return 'lost' end
if op == 'again' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[4], member)
  redis.call('HINCRBY', KEYS[2], 'asks', 1)
  return 'again'
end
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[4])
  local seq = redis.call('HGET', KEYS[2], 'seq')
  if seq and seq ~= '' and redis.call('GET', KEYS[5]) == seq then
    local before = redis.call('HGET', KEYS[2], 'prev_seq')
    if before and before ~= '' then
      redis.call('SET', KEYS[5], before, 'KEEPTTL')
    else
      redis.call('DEL', KEYS[5])
    end
  end
end
redis.call('ZREM', KEYS[1], member)
redis.call('DEL', KEYS[2])
local entry = {}
for _, pair in ipairs(cjson.decode(ARGV[6])) do
  entry[#entry + 1] = pair[1]
  entry[#entry + 1] = pair[2]
end
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(entry))
