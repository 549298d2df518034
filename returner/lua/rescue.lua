-- Claim the pending entries of a consumer that has gone silent (a crashed worker),
-- with their delivery counts. Entries idle for less than ARGV[4] are left alone, so a
-- consumer that comes back keeps what it is working on. Entries deleted from the
-- stream while pending are acked.
-- KEYS[1] stream
-- ARGV[1] group  ARGV[2] claimer  ARGV[3] silent consumer  ARGV[4] min idle ms  ARGV[5] count
-- Returns: {entries, gone} where entries is an array of {id, fields, deliveries}
local pel = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[4]), '-', '+',
                       tonumber(ARGV[5]), ARGV[3])
local out, gone = {}, 0
for _, p in ipairs(pel) do
  local id = p[1]
  local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], id)
  if got[1] and got[1][2] then
    out[#out + 1] = {id, got[1][2], p[4] + 1}
  elseif #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    gone = gone + 1
  end
end
return {out, gone}
