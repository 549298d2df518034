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
  return {}
end
return reply[1][2]
