-- Study database, version 1. Times are ISO 8601 UTC strings; JSON lists are stored as TEXT.
CREATE TABLE patients (
    id            TEXT PRIMARY KEY,            -- DICOM PatientID, or "hmac-sha256:<hex>" of it when pseudonymising
    pseudonymized INTEGER NOT NULL DEFAULT 0,
    created       TEXT NOT NULL
);

CREATE TABLE studies (
    id           TEXT PRIMARY KEY,             -- StudyInstanceUID (its keyed hash when pseudonymising) or a uuid
    patient_id   TEXT REFERENCES patients(id),
    received     TEXT NOT NULL,
    sha256       TEXT NOT NULL UNIQUE,         -- of the uploaded file's bytes: the same file twice is one study
    format       TEXT NOT NULL,                -- JPEG | PNG | DICOM
    modality     TEXT,
    manufacturer TEXT,
    device_model TEXT,
    width        INTEGER NOT NULL,             -- of the original image, px
    height       INTEGER NOT NULL,
    warnings     TEXT NOT NULL DEFAULT '[]',   -- reader warnings (JSON list): not a chest, not human, ...
    image_png    BLOB NOT NULL                 -- 8-bit grey copy for the viewer, longest side <= 1024 px
);
CREATE INDEX studies_patient ON studies(patient_id);

CREATE TABLE predictions (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id               TEXT NOT NULL REFERENCES studies(id),
    model_name             TEXT NOT NULL,
    model_version          TEXT,
    model_checksum         TEXT NOT NULL,
    probability            REAL NOT NULL,
    calibrated_probability REAL,
    threshold              REAL NOT NULL,
    threshold_info         TEXT,               -- JSON: how the threshold was chosen (checkpoint's threshold_info)
    label                  TEXT NOT NULL,
    latency_ms             REAL NOT NULL,
    created                TEXT NOT NULL,
    heatmap_png            BLOB                -- Grad-CAM overlay, when one was computed
);
CREATE INDEX predictions_study ON predictions(study_id);

CREATE TABLE reviews (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id      TEXT NOT NULL REFERENCES studies(id),
    prediction_id INTEGER REFERENCES predictions(id),  -- the prediction the reviewer saw (the latest one)
    reviewer      TEXT NOT NULL,
    decision      TEXT NOT NULL CHECK (decision IN ('agree', 'disagree')),
    comment       TEXT NOT NULL DEFAULT '',
    created       TEXT NOT NULL
);
CREATE INDEX reviews_study ON reviews(study_id);
