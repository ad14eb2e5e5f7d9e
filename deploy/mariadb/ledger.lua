-- The ledger client: inserts 1, 2, 3, ... one row per event, each in its own transaction
-- (autocommit), and prints a number only once the server has acknowledged its insert.
-- Afterwards every printed number must be in the table. Any error ends the run (sysbench's
-- default), so a client that saw one says so by its exit status.

function prepare()
    local con = sysbench.sql.driver():connect()
    con:query("DROP TABLE IF EXISTS ledger")
    con:query("CREATE TABLE ledger (seq INT PRIMARY KEY) ENGINE=InnoDB")
end

function thread_init()
    con = sysbench.sql.driver():connect()
    seq = 0
end

function event()
    seq = seq + 1
    con:query("INSERT INTO ledger (seq) VALUES (" .. seq .. ")")
    print("acked " .. seq)
end

function thread_done()
    con:disconnect()
end
