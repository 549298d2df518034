-- Settle deliveries whose outcome is durable, at once: for each entry still pending in
-- the group, ack it, add its dead letter if it has one, emit its event (and PUBLISH it
-- when asked), and delete it from the stream so the stream never grows without bound.
-- An entry someone else settled first (XACK 0) gets neither a dead letter nor an event:
-- every settled entry has exactly one event, and an unsettled one has none.
-- KEYS[1] stream  KEYS[2] dead letters {L}:dead  KEYS[3] events {L}:events
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] events MAXLEN (approximate)  ARGV[4] '1':
-- also PUBLISH each event on events:{request_id}  ARGV[5] dead letters MAXLEN (approximate)
-- ARGV[6..] 11 values per entry: entry ID, '1' to dead-letter it, request_id, image_id,
-- status, outcome, file_path, error, timestamp, deliveries, task (the original bytes,
-- or their first KiB, sent only for a dead letter)
-- Returns: the number of entries this call settled (= events emitted)
local settled = 0
for i = 6, #ARGV, 11 do
  local id, rid, iid, status = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local outcome, path, err, ts = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    settled = settled + 1
    if ARGV[i + 1] == '1' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'task', ARGV[i + 10],
                 'error', err, 'deliveries', ARGV[i + 9], 'entry_id', id,
                 'consumer', ARGV[2], 'request_id', rid, 'image_id', iid)
    end
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'request_id', rid,
               'image_id', iid, 'status', status, 'outcome', outcome, 'file_path', path,
               'error', err, 'entry_id', id, 'timestamp', ts)
    if ARGV[4] == '1' and rid ~= '' then
      local data = {request_id = rid, image_id = iid, status = status, outcome = outcome,
                    file_path = path, error = err, entry_id = id, timestamp = ts}
      local name = status == 'completed' and 'hosting_completed' or 'hosting_failed'
      redis.call('PUBLISH', 'events:' .. rid,
                 cjson.encode({request_id = rid, event = name, data = data}))
    end
  end
  redis.call('XDEL', KEYS[1], id)
end
return settled
