-- Reads the pending hashes of claimed confirmations (docs/contract.md section 6.1) in one
-- call: only the fields the confirmer uses, so that a batch costs one command instead of one
-- per confirmation.
--
-- KEYS: the pending hashes, one per member.
-- ARGV: the names of the fields to read, in order.
--
-- Answers a flat array with 1 + #ARGV strings per key, in the order of KEYS: "1" when the
-- hash exists ("" when it is gone: it outlived its deadline by a day), then each field's
-- value ("" when it has none).

local out = {}
for _, key in ipairs(KEYS) do
  local values = redis.call('HMGET', key, unpack(ARGV))
  local exists = ''
  for j = 1, #ARGV do
    if values[j] then exists = '1' else values[j] = '' end
  end
  out[#out + 1] = exists
  for j = 1, #ARGV do
    out[#out + 1] = values[j]
  end
end
return out
