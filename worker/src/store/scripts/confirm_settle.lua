-- Settles the claimed confirmations of one batch (docs/contract.md section 6.1), each on its
-- own: asks again later, or ends it with its stream entry. Only a claim's holder may settle
-- it. One call for the whole batch, so that settling costs one round trip per batch instead
-- of one per confirmation.
--
-- KEYS[1]: the pending confirmations, by due time. KEYS[2]: the deliveries stream. Then three
--   keys per settle, for the i-th at 3i .. 3i+2: the member's pending hash, the
--   notification's sent marker, and its incident's sequence (any key when it has none).
-- ARGV[1]: the stream's maxlen.
-- ARGV[2]: a JSON array with one array per settle, in the order of the keys:
--   [member, token, op, due, failed, entry]
--   member: the notification_uuid; token: the claim's token;
--   op: "again" or "done";
--   due: again: the next due time in ms, as a decimal string;
--   failed: done: "1" when the request failed after its 202: the sent marker is deleted (so
--     that a replay of the dead letter is delivered again) and the incident's sequence is
--     put back to what it was before this delivery, if no later delivery moved it since;
--   entry: done: the stream entry as [[name, value], ...].
--
-- Answers an array with one string per settle, in the same order: "lost" when the claim is
-- no longer the caller's (it ran out and another confirmer took the member, or it was
-- settled already), "again" after rescheduling, and the stream entry's id once done.

local maxlen = ARGV[1]
local out = {}
for i, settle in ipairs(cjson.decode(ARGV[2])) do
  local hash, sent, seqkey = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local member, token, op = settle[1], settle[2], settle[3]
  local answer
  if redis.call('ZSCORE', KEYS[1], member) ~= token then
    answer = 'lost'
  elseif op == 'again' then
    redis.call('ZADD', KEYS[1], 'XX', settle[4], member)
    redis.call('HINCRBY', hash, 'asks', 1)
    answer = 'again'
  else
    if settle[5] == '1' then
      redis.call('DEL', sent)
      local seq = redis.call('HGET', hash, 'seq')
      if seq and seq ~= '' and redis.call('GET', seqkey) == seq then
        local before = redis.call('HGET', hash, 'prev_seq')
        if before and before ~= '' then
          redis.call('SET', seqkey, before, 'KEEPTTL')
        else
          redis.call('DEL', seqkey)
        end
      end
    end
    redis.call('ZREM', KEYS[1], member)
    redis.call('DEL', hash)
    local entry = {}
    for _, pair in ipairs(settle[6]) do
      entry[#entry + 1] = pair[1]
      entry[#entry + 1] = pair[2]
    end
    answer = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(entry))
  end
  out[i] = answer
end
return out
