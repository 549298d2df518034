-- Re-read this consumer's own pending entries (history), with delivery counts.
-- Entries deleted from the stream while pending cannot be processed: they are acked.
-- Reading history increments each entry's delivery count, so a crash counts.
-- KEYS[1] stream
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] read after this ID  ARGV[4] count
-- Returns: {entries, last_id, gone} where entries is an array of {id, fields, deliveries}
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[4]),
                         'STREAMS', KEYS[1], ARGV[3])
local out, last, gone = {}, ARGV[3], 0
if not reply then
  return {out, last, gone}
end
for _, e in ipairs(reply[1][2]) do
  last = e[1]
  if not e[2] or #e[2] == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
    gone = gone + 1
  else
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    out[#out + 1] = {e[1], e[2], p[1][4]}
  end
end
return {out, last, gone}
