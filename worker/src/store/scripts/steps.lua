-- The admission checks and records of a batch of jobs, in the order they came, in one atomic
-- step (SPEC section 7).
--
-- KEYS[1]: the deliveries stream. KEYS[2]: the pending confirmations, by due time. Then five
--   keys per job, for the i-th job at 5i-2 .. 5i+2: its sent marker, its lease, its
--   incident's sequence, its team's cooldown and its pending confirmation.
-- ARGV[1]: lease ms. ARGV[2]: stream maxlen. ARGV[3]: dedupe ttl s. ARGV[4]: sequence ttl s.
-- ARGV[5]: a JSON array with one array per job, in the order of the keys. ARGV[6] on: the
--   bodies of the pending confirmations, raw.
--   [op, token, sequence, fields, pending]
--   op: "a" (admission) or "r" (record);
--   token: the lease token of this round of the job;
--   sequence: the incident's sequence as a decimal string, or "" (never a JSON number: Lua
--     numbers are doubles, exact only up to 2^53);
--   fields: a record's stream entry as [[name, value], ...] in order; [] for an admission;
--   pending: null, or a record's confirmation to come: [member, due ms, ttl ms,
--     [[name, value], ...], n]: the hash at the job's fifth key gets the fields, `body` =
--     ARGV[n] (a number), and `prev_seq`, the incident's sequence before this record, for a
--     rollback should the request fail after its 202; it lives ttl ms; the member goes into
--     KEYS[2], due then.
--
-- Answers an array with one string per job, in the same order:
--   admission: "duplicate", "cooldown:<ms>", "busy", "stale" or "ok" (the lease is taken);
--   record: the stream entry's id, or "" when the delivery was already recorded. A record
--     writes the stream entry, the sent marker and the incident's sequence, and frees the
--     lease.
--
-- Running a step twice changes nothing the first run did not: a lease is taken again by its
-- own token, and a record whose answer was lost (the connection dropped after Redis ran it)
-- finds its sent marker and adds nothing, so the stream keeps one entry per notification.
-- Sequences are 64-bit integers and a nanosecond timestamp is past 2^53, so they are compared
-- as the decimal strings the worker wrote: a shorter number is the smaller, an equal length
-- compares as text, and a negative number turns both around.

local lease_ms, maxlen, dedupe_ttl, seq_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function seq_above(a, b)
  local a_neg, b_neg = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if a_neg ~= b_neg then return b_neg end
  if #a ~= #b then
    if a_neg then return #a < #b end
    return #a > #b
  end
  if a_neg then return a < b end
  return a > b
end
local calls = cjson.decode(ARGV[5])
local out = {}
for i, call in ipairs(calls) do
  local k = 5 * i - 2
  local sent, lease, seqkey, cool, pendkey = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local op, token, seq, fields, pending = call[1], call[2], call[3], call[4], call[5]
  local answer
  if op == 'a' then
    if redis.call('EXISTS', sent) == 1 then
      answer = 'duplicate'
    else
      local cooling = redis.call('PTTL', cool)
      if cooling > 0 then
        answer = 'cooldown:' .. cooling
      elseif not redis.call('SET', lease, token, 'NX', 'PX', lease_ms)
          and redis.call('GET', lease) ~= token then
        answer = 'busy'
      else
        -- Taken now, or already ours from a step that ran twice.
        redis.call('PEXPIRE', lease, lease_ms)
        answer = 'ok'
        if seq ~= '' then
          local last = redis.call('GET', seqkey)
          if last and not seq_above(seq, last) then
            redis.call('DEL', lease)
            answer = 'stale'
          end
        end
      end
    end
  else
    answer = ''
    if redis.call('EXISTS', sent) == 0 then
      local entry = {}
      for _, pair in ipairs(fields) do
        entry[#entry + 1] = pair[1]
        entry[#entry + 1] = pair[2]
      end
      answer = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(entry))
      redis.call('SET', sent, '1', 'EX', dedupe_ttl)
      local before = ''
      if seq ~= '' then
        local last = redis.call('GET', seqkey)
        if last then before = last end
        if (not last) or seq_above(seq, last) then
          redis.call('SET', seqkey, seq, 'EX', seq_ttl)
        end
      end
      if type(pending) == 'table' then
        local member, due, ttl, hash = pending[1], pending[2], pending[3], pending[4]
        local flat = {'prev_seq', before, 'body', ARGV[pending[5]]}
        for _, pair in ipairs(hash) do
          flat[#flat + 1] = pair[1]
          flat[#flat + 1] = pair[2]
        end
        redis.call('HSET', pendkey, unpack(flat))
        redis.call('PEXPIRE', pendkey, ttl)
        redis.call('ZADD', KEYS[2], due, member)
      end
    end
    if redis.call('GET', lease) == token then redis.call('DEL', lease) end
  end
  out[i] = answer
end
return out
