-- Move up to COUNT elements of the upstream list into the stream, then read up to
-- COUNT new entries for this consumer. One atomic step: a crash of the caller at any
-- instant neither loses nor duplicates a task in transit, and the entries this call
-- adds are the ones it reads, so none are left undelivered while workers sleep.
-- KEYS[1] upstream list L      KEYS[2] stream {L}:stream
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] count
-- Returns: array of {id, {field, value, ...}} (empty when there is nothing to do)
local count = tonumber(ARGV[3])
local moved = redis.call('LPOP', KEYS[1], count)
if moved then
  for _, task in ipairs(moved) do
    redis.call('XADD', KEYS[2], '*', 'task', task)
  end
end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count,
                         'STREAMS', KEYS[2], '>')
if not reply then
  -- Nothing new. Before Redis 7.2 an empty read leaves the consumer's idle time in
  -- XINFO CONSUMERS as it was, and an idle live worker would look gone; reading its
  -- (empty) history refreshes it. Only when it holds nothing: reading history counts
  -- a delivery of every entry held.
  if #redis.call('XPENDING', KEYS[2], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[2], '0')
  end
  return {}
end
return reply[1][2]
