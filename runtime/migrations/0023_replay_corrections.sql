-- Replay sends an original's later corrections right behind it, even those outside the
-- replay's selection; they are counted apart from the selected events sent, so that
-- ``sent + withheld = examined`` still holds and the operator sees what came along.
-- (Voided events withheld are counted in ``withheld`` under VOIDED, like other outcomes.)
ALTER TABLE replay ADD COLUMN corrections_sent bigint NOT NULL DEFAULT 0;
